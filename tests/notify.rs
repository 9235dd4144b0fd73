//! sd_notify: the test binds a Unix datagram socket, starts the daemon with
//! it as `NOTIFY_SOCKET`, and checks every message the masters send, and
//! which process sent it (SO_PASSCRED, as systemd does): start, reloads
//! good and bad, binary upgrades good and failed, stop, the watchdog.

mod common;

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};

fn config(workers: &str) -> String {
    format!(
        "[daemon]\npid_file = \"{{dir}}/preforkd.pid\"\n\
         [control]\nsocket = \"{{dir}}/control.sock\"\n{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            &format!("workers = {workers}\ngraceful_timeout = \"5s\""),
        )
    )
}

/// One datagram: who sent it, and its `KEY=VALUE` lines.
#[derive(Debug, Clone)]
struct Msg {
    pid: i32,
    fields: Vec<(String, String)>,
}

impl Msg {
    /// The keys, in order: `READY STATUS`.
    fn kinds(&self) -> String {
        let keys: Vec<&str> = self.fields.iter().map(|(k, _)| k.as_str()).collect();
        keys.join(" ")
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The test's NOTIFY_SOCKET.
struct Notify {
    sock: UnixDatagram,
    path: String,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempdir();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        setsockopt(&sock, sockopt::PassCred, &true).unwrap();
        Notify {
            sock,
            path: path.to_str().unwrap().to_string(),
            _dir: dir,
        }
    }

    /// The same on an abstract socket: `NOTIFY_SOCKET=@name`.
    fn new_abstract() -> Notify {
        use std::os::linux::net::SocketAddrExt;
        let dir = tempdir();
        let name = format!("preforkd-test-{}-{}", std::process::id(), monotonic_usec());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        setsockopt(&sock, sockopt::PassCred, &true).unwrap();
        Notify {
            sock,
            path: format!("@{name}"),
            _dir: dir,
        }
    }

    /// The next datagram, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Msg> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let (n, pid) = match recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) {
            Ok(m) => {
                let pid = m
                    .cmsgs()
                    .unwrap()
                    .find_map(|c| match c {
                        ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                        _ => None,
                    })
                    .expect("SO_PASSCRED gives the sender's pid");
                (m.bytes, pid)
            }
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg: {e}"),
        };
        let text = String::from_utf8(buf[..n].to_vec()).expect("UTF-8");
        assert!(text.ends_with('\n'), "{text:?}");
        let fields = text
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{text:?}"));
                (k.to_string(), v.to_string())
            })
            .collect();
        Some(Msg { pid, fields })
    }

    /// The next datagram; panics after [`DEADLINE`].
    fn next(&self, d: &Daemon) -> Msg {
        self.recv(DEADLINE)
            .unwrap_or_else(|| panic!("no sd_notify message; log:\n{}", d.log_text()))
    }

    /// Everything already queued.
    fn drain(&self) -> Vec<Msg> {
        std::iter::from_fn(|| self.recv(Duration::from_millis(1))).collect()
    }
}

fn start(n: &Notify, workers: &str, env: &[(&str, &str)]) -> Daemon {
    let mut all = vec![("NOTIFY_SOCKET", n.path.as_str())];
    all.extend_from_slice(env);
    Daemon::start_bin(&bin(), &config(workers), &all)
}

/// CLOCK_MONOTONIC in µs, as the daemon reads it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Waits until process `pid` (not necessarily our child) is gone.
fn wait_gone(d: &Daemon, pid: i32) {
    wait_for(DEADLINE, || (!alive(pid)).then_some(()))
        .unwrap_or_else(|| panic!("pid {pid} still runs; log:\n{}", d.log_text()));
}

/// Start, a good reload, a reload of a broken config, stop: the whole
/// sequence, nothing more.
#[test]
fn start_reload_and_stop_are_announced() {
    let n = Notify::new();
    let mut d = start(&n, "2", &[]);
    let master = d.pid();
    let ready = n.next(&d);
    assert_eq!(
        (ready.kinds().as_str(), ready.pid),
        ("READY STATUS", master),
        "{ready:?}"
    );
    assert_eq!(
        ready.get("STATUS"),
        Some("generation 1; echo 2/2 workers"),
        "{ready:?}"
    );
    // READY=1 comes once the listeners are bound and the workers ready.
    assert_eq!(d.wait_workers(2).len(), 2);
    let v = wait_settled(&d);
    assert_eq!(v["generation"], 1);

    // A good reload: RELOADING=1 with the time it started, then READY=1.
    let before = monotonic_usec();
    let out = cli(&d, &["reload"]);
    let after = monotonic_usec();
    assert!(out.status.success(), "{}", show(&out));
    let reloading = n.next(&d);
    assert_eq!(
        reloading.kinds(),
        "RELOADING MONOTONIC_USEC STATUS",
        "{reloading:?}"
    );
    assert_eq!(reloading.get("RELOADING"), Some("1"));
    let usec: u64 = reloading.get("MONOTONIC_USEC").unwrap().parse().unwrap();
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is not between {before} and {after}"
    );
    assert_eq!(
        reloading.get("STATUS"),
        Some("generation 1; echo 2/2 workers; reloading (generation 2)")
    );
    let done = n.next(&d);
    assert_eq!(done.kinds(), "READY STATUS", "{done:?}");
    assert_eq!(
        done.get("STATUS"),
        Some("generation 2; echo 2/2 workers; last reload ok (generation 2)")
    );

    // A config that does not validate: RELOADING=1 … READY=1 all the same,
    // and the status says what failed.
    wait_settled(&d);
    d.write_config(&config("0"));
    let out = cli(&d, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let reloading = n.next(&d);
    assert_eq!(reloading.kinds(), "RELOADING MONOTONIC_USEC STATUS");
    let done = n.next(&d);
    assert_eq!(done.kinds(), "READY STATUS", "{done:?}");
    let status = done.get("STATUS").unwrap();
    assert!(
        status.starts_with(
            "generation 2; echo 2/2 workers; last reload failed (generation 3): invalid config: "
        ) && status.contains("preforkd.toml:"),
        "{status}"
    );
    assert!(!status.contains("keeps serving"), "{status}");

    // Stop: STOPPING=1, and nothing after it.
    let out = cli(&d, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(d.wait_exit(DEADLINE).code(), Some(0));
    let rest = n.drain();
    let kinds: Vec<String> = rest.iter().map(Msg::kinds).collect();
    assert_eq!(kinds, ["STOPPING STATUS"], "{rest:?}");
    assert_eq!(rest[0].get("STATUS"), Some("stopping (graceful)"));
    assert!(rest.iter().all(|m| m.pid == master), "{rest:?}");
}

/// A binary upgrade: the old master says `MAINPID=` the new one, the new
/// one says `MAINPID=` itself and `READY=1`; the new master's stop is
/// announced by it.
#[test]
fn an_upgrade_hands_the_main_pid_over() {
    let n = Notify::new();
    let mut d = start(&n, "2", &[]);
    let old = d.pid();
    assert_eq!(n.next(&d).kinds(), "READY STATUS");
    wait_settled(&d);

    let out = cli(&d, &["upgrade"]);
    assert!(out.status.success(), "{}", show(&out));
    let new = pid_file_pid(&d.path("preforkd.pid")).expect("a pid file");
    assert_ne!(new, old);
    assert_eq!(d.wait_exit(DEADLINE).code(), Some(0), "{}", d.log_text());
    let v = wait_settled(&d);
    assert_eq!(v["pid"], new);
    let out = cli(&d, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_gone(&d, new);

    let all = n.drain();
    let from = |pid: i32| -> Vec<Msg> { all.iter().filter(|m| m.pid == pid).cloned().collect() };
    assert!(all.iter().all(|m| m.pid == old || m.pid == new), "{all:?}");
    let from_old = from(old);
    let kinds: Vec<String> = from_old.iter().map(Msg::kinds).collect();
    assert_eq!(kinds, ["MAINPID"], "{from_old:?}");
    assert_eq!(from_old[0].get("MAINPID"), Some(new.to_string().as_str()));

    let from_new = from(new);
    let kinds: Vec<String> = from_new.iter().map(Msg::kinds).collect();
    assert_eq!(
        kinds,
        ["MAINPID READY STATUS", "STOPPING STATUS"],
        "{from_new:?}"
    );
    assert_eq!(from_new[0].get("MAINPID"), Some(new.to_string().as_str()));
    assert_eq!(
        from_new[0].get("STATUS"),
        Some("generation 2; echo 2/2 workers")
    );
}

/// A new master that cannot boot says nothing at all: its `STOPPING=1`
/// would tell the service manager that the service is going down while
/// the old master goes on serving.
#[test]
fn a_failed_upgrade_is_silent() {
    let n = Notify::new();
    let mut d = start(&n, "1", &[]);
    let old = d.pid();
    assert_eq!(n.next(&d).kinds(), "READY STATUS");
    wait_settled(&d);
    d.write_config(&(config("1") + "[service.handler.options]\nfoo = 1\n"));
    let out = cli(&d, &["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    d.write_config(&config("1"));
    let out = cli(&d, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(d.wait_exit(DEADLINE).code(), Some(0));
    let all = n.drain();
    let kinds: Vec<String> = all.iter().map(Msg::kinds).collect();
    assert_eq!(kinds, ["STOPPING STATUS"], "{all:?}");
    assert!(all.iter().all(|m| m.pid == old), "{all:?}");
}

/// A worker that dies: the status shows the pool short, then whole again.
/// Workers do not inherit NOTIFY_SOCKET.
#[test]
fn the_status_follows_the_workers() {
    let n = Notify::new();
    let d = start(&n, "2", &[]);
    assert_eq!(n.next(&d).kinds(), "READY STATUS");
    let workers = d.wait_workers(2);
    for pid in &workers {
        // What /proc shows of a worker's environment. (The process title
        // reuses that memory, so this is a weak check; tests/plugins_api.rs
        // reads the environment from inside a worker.)
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
            "worker {pid} has NOTIFY_SOCKET"
        );
    }
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(workers[0], libc::SIGKILL) };
    let short = n.next(&d);
    assert_eq!(
        (short.kinds().as_str(), short.get("STATUS")),
        ("STATUS", Some("generation 1; echo 1/2 workers")),
        "{short:?}"
    );
    let whole = n.next(&d);
    assert_eq!(
        whole.get("STATUS"),
        Some("generation 1; echo 2/2 workers"),
        "{whole:?}"
    );
}

/// WATCHDOG_USEC=200000: WATCHDOG=1 every 100 ms, from the master in
/// charge; across an upgrade the new master takes it over.
#[test]
fn the_watchdog_is_fed() {
    let n = Notify::new();
    let mut d = start(&n, "1", &[("WATCHDOG_USEC", "200000")]);
    let old = d.pid();
    let count_for = |window: Duration, pid: i32| {
        let end = Instant::now() + window;
        let mut pings = 0;
        while let Some(m) = n.recv(end.saturating_duration_since(Instant::now())) {
            if m.kinds() == "WATCHDOG" && m.pid == pid {
                pings += 1;
            }
            if Instant::now() >= end {
                break;
            }
        }
        pings
    };
    // Whatever came before READY (the pings start with the loop).
    while n.next(&d).kinds() != "READY STATUS" {}
    let pings = count_for(Duration::from_secs(1), old);
    assert!(
        pings >= 3,
        "{pings} WATCHDOG=1 in 1 s; log:\n{}",
        d.log_text()
    );

    let out = cli(&d, &["upgrade"]);
    assert!(out.status.success(), "{}", show(&out));
    let new = pid_file_pid(&d.path("preforkd.pid")).unwrap();
    assert_eq!(d.wait_exit(DEADLINE).code(), Some(0));
    // The old master's pings end with its MAINPID=.
    let mut handed_over = false;
    let deadline = Instant::now() + DEADLINE;
    let mut new_pings = 0;
    while new_pings < 3 && Instant::now() < deadline {
        let m = n.next(&d);
        if m.pid == old {
            assert!(!handed_over, "{m:?} after MAINPID from the old master");
            handed_over = m.kinds() == "MAINPID";
        } else if m.pid == new && m.kinds() == "WATCHDOG" {
            new_pings += 1;
        }
    }
    assert!(handed_over && new_pings >= 3, "log:\n{}", d.log_text());
    let out = cli(&d, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_gone(&d, new);
}

/// A WATCHDOG_PID that is not the master's: the timeout is not for it.
#[test]
fn a_watchdog_for_another_pid_is_ignored() {
    let n = Notify::new();
    // 10 ms: dozens of pings during the start, status calls and stop below.
    let mut d = start(
        &n,
        "1",
        &[("WATCHDOG_USEC", "20000"), ("WATCHDOG_PID", "1")],
    );
    assert_eq!(n.next(&d).kinds(), "READY STATUS");
    for _ in 0..3 {
        status(&d);
    }
    let out = cli(&d, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(d.wait_exit(DEADLINE).code(), Some(0));
    let all = n.drain();
    let kinds: Vec<String> = all.iter().map(Msg::kinds).collect();
    assert_eq!(kinds, ["STOPPING STATUS"], "{all:?}");
}

/// `NOTIFY_SOCKET=@name` is the abstract socket `name`, as sd_notify(3)
/// says (not a file called `@name`).
#[test]
fn an_abstract_notify_socket_works() {
    let n = Notify::new_abstract();
    let d = start(&n, "1", &[]);
    let ready = n.next(&d);
    assert_eq!(
        (ready.kinds().as_str(), ready.pid),
        ("READY STATUS", d.pid())
    );
}

/// SIGTERM with a shutdown delay: `STATUS=` says so (and counts down),
/// then the stop is announced as usual.
#[test]
fn the_shutdown_delay_is_announced() {
    let n = Notify::new();
    let text = format!(
        "[daemon]\nshutdown_delay = \"2s\"\n\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
    );
    let mut d = Daemon::start_bin(&bin(), &text, &[("NOTIFY_SOCKET", n.path.as_str())]);
    assert_eq!(n.next(&d).kinds(), "READY STATUS");
    d.signal(libc::SIGTERM);
    let delay = n.next(&d);
    assert_eq!(
        (delay.kinds().as_str(), delay.get("STATUS")),
        ("STATUS", Some("shutdown delay: not ready, stopping in 2s")),
        "{delay:?}"
    );
    // Then the stop, after the delay.
    let stopping = std::iter::from_fn(|| Some(n.next(&d)))
        .find(|m| m.get("STOPPING").is_some())
        .unwrap();
    assert_eq!(
        stopping.get("STATUS"),
        Some("stopping (graceful)"),
        "{stopping:?}"
    );
    assert_eq!(d.wait_exit(DEADLINE).code(), Some(0), "{}", d.log_text());
}
