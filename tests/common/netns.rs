//! A small private network for fleet tests: a load balancer's namespace
//! and one namespace per host, each with an address of its own on a
//! private /24, or, where namespaces cannot be made (not root, no `ip`),
//! loopback addresses of the test's own namespace (127.0.0.2, .3, ...).
//!
//! Topology with namespaces (X picked from the test's pid, skipping any
//! 10.213.X.0/24 already routed here):
//!
//! ```text
//!   root ns (the test, its clients)      pfr<pid>  10.213.X.1/24
//!        |  veth
//!   <ns>-lb: bridge br0                  10.213.X.10/24 (HAProxy)
//!        |  veth vh0, vh1, ...
//!   <ns>-h0, -h1, ...: eth0              10.213.X.2, .3, ... /24
//! ```
//!
//! The bridge lives in the balancer's namespace, whose netfilter tables
//! are empty, so a host firewall (Docker's FORWARD policy, br_netfilter)
//! never sees the bridged frames. Everything is deleted on drop, after a
//! panic too; processes still running in a namespace keep it alive until
//! they die, so drop the processes first.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::Command;

/// Where the hosts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Namespaces,
    Loopback,
}

pub struct Net {
    pub mode: Mode,
    /// Each host's address (its own namespace's, or 127.0.0.N).
    pub hosts: Vec<Ipv4Addr>,
    /// The balancer's address, as the hosts see it.
    pub lb: Ipv4Addr,
    /// The test's (the clients') address, as the balancer sees it.
    pub client: Ipv4Addr,
    /// Namespace names: hosts', then the balancer's (empty in loopback mode).
    host_ns: Vec<String>,
    lb_ns: Option<String>,
    root_link: Option<String>,
}

/// Runs `ip ARGS`; Err with its stderr if it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

impl Net {
    /// `n` hosts in namespaces of their own, or on loopback addresses
    /// (saying so in one line) when namespaces cannot be made.
    pub fn new(n: usize) -> Net {
        match Net::namespaces(n) {
            Ok(net) => net,
            Err(e) => {
                eprintln!(
                    "network namespaces unavailable ({e}): hosts on 127.0.0.2..127.0.0.{} instead",
                    n + 1
                );
                Net::loopback(n)
            }
        }
    }

    /// Hosts on 127.0.0.2, .3, ...; the balancer and the clients in the
    /// test's own namespace (the clients bind 127.0.0.9, so that the
    /// hosts can tell them from the balancer).
    pub fn loopback(n: usize) -> Net {
        Net {
            mode: Mode::Loopback,
            hosts: (0..n)
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
                .collect(),
            lb: Ipv4Addr::new(127, 0, 0, 1),
            client: Ipv4Addr::new(127, 0, 0, 9),
            host_ns: Vec::new(),
            lb_ns: None,
            root_link: None,
        }
    }

    fn namespaces(n: usize) -> Result<Net, String> {
        // SAFETY: geteuid(2) has no memory effects.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("no `ip` command (iproute2)".into());
        }
        let pid = std::process::id();
        let routes = ip_output(&["-4", "route", "show", "table", "all"]);
        let addrs = ip_output(&["-4", "-o", "addr"]);
        let x = (0..200)
            .map(|k| 20 + (pid as usize + k) % 200)
            .find(|x| {
                let prefix = format!("10.213.{x}.");
                !routes.contains(&prefix) && !addrs.contains(&prefix)
            })
            .ok_or("every 10.213.X.0/24 is in use")? as u8;
        let mut net = Net {
            mode: Mode::Namespaces,
            hosts: (0..n)
                .map(|i| Ipv4Addr::new(10, 213, x, 2 + i as u8))
                .collect(),
            lb: Ipv4Addr::new(10, 213, x, 10),
            client: Ipv4Addr::new(10, 213, x, 1),
            host_ns: Vec::new(),
            lb_ns: None,
            root_link: None,
        };
        // From here on, drop deletes whatever was made.
        let lb = format!("pfd{pid}-lb");
        ip(&["netns", "add", &lb])?;
        net.lb_ns = Some(lb.clone());
        let sub = |last: u8| format!("10.213.{x}.{last}/24");
        ip(&["-n", &lb, "link", "set", "lo", "up"])?;
        ip(&["-n", &lb, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lb, "addr", "add", &sub(10), "dev", "br0"])?;
        ip(&["-n", &lb, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("pfd{pid}-h{i}");
            ip(&["netns", "add", &ns])?;
            net.host_ns.push(ns.clone());
            let port = format!("vh{i}");
            ip(&[
                "-n", &lb, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &lb, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &sub(2 + i as u8), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        let root = format!("pfr{pid}");
        ip(&[
            "link", "add", &root, "type", "veth", "peer", "name", "up0", "netns", &lb,
        ])?;
        net.root_link = Some(root.clone());
        ip(&["-n", &lb, "link", "set", "up0", "master", "br0", "up"])?;
        ip(&["addr", "add", &sub(1), "dev", &root])?;
        ip(&["link", "set", &root, "up"])?;
        // The balancer opens a connection to a host per client connection,
        // and closes first: its ports sit in TIME_WAIT. Let it reuse them
        // and give it every port (its namespace's settings only).
        for (key, value) in [
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.ip_local_port_range", "1024 65000"),
        ] {
            let ok = Command::new("ip")
                .args(["netns", "exec", &lb, "sysctl", "-qw"])
                .arg(format!("{key}={value}"))
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("note: could not set {key} in {lb}");
            }
        }
        Ok(net)
    }

    /// A command that runs `program` on host `i` (in its namespace).
    pub fn host_command(&self, i: usize, program: &std::path::Path) -> Command {
        match self.host_ns.get(i) {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// A command that runs `program` where the balancer lives.
    pub fn lb_command(&self, program: &str) -> Command {
        match &self.lb_ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Net {
    /// Host `i`'s kernel TCP counters that tell of lost connections
    /// (resets sent, aborts, listen queue overflows), those not zero; empty
    /// in loopback mode (the counters would be the whole machine's).
    pub fn host_tcp_counters(&self, i: usize) -> String {
        let Some(ns) = self.host_ns.get(i) else {
            return String::new();
        };
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "nstat", "-az"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (name, value) = (f.next()?, f.next()?);
                let wanted = ["Abort", "Listen", "OutRsts", "EstabResets", "AttemptFails"]
                    .iter()
                    .any(|k| name.contains(k));
                (wanted && value != "0").then(|| format!("{name}={value}"))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.host_ns.iter().chain(self.lb_ns.iter()) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        if let Some(link) = &self.root_link {
            // Gone with its peer's namespace already, as a rule.
            let _ = ip(&["link", "del", link]);
        }
    }
}
