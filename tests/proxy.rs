//! The PROXY protocol: headers written by the test (v1 and v2, over TCP
//! and Unix listeners) and by HAProxy (`send-proxy`, `send-proxy-v2`),
//! in both worker modes. The header's client is the peer everywhere: the
//! exec program's UCSPI variables, `deny`, the scoreboard; a header from
//! outside `proxy_from`, a garbage one and a slow one are cut and counted.
//!
//! The HAProxy part needs Debian's `haproxy`; without it, it says so and
//! skips.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CONTROL: &str = "[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// The exec program: its environment, then the line the client sent
/// after the header (the handler gets every byte past the header).
const ENV_SH: &str = "/usr/bin/env\nread -r line\necho \"LINE=$line\"\n";

fn mode_line(mode: &str) -> &'static str {
    match mode {
        "async" => "mode = \"async\"\n",
        _ => "",
    }
}

/// An exec service `x` (TCP and Unix) taking `version` headers from
/// loopback, denying 192.0.2.66; started with its script in place.
fn start(mode: &str, version: &str, from: &str) -> Daemon {
    let dir = tempdir();
    script(dir.path(), "env.sh", ENV_SH);
    let extra = format!(
        "{}workers = 1\nproxy_protocol = {version:?}\nproxy_from = [{from}]\ndeny = [\"192.0.2.66\"]\n",
        mode_line(mode)
    );
    let text = format!(
        "{CONTROL}{}\n[service.handler.options]\ncommand = [\"{{dir}}/env.sh\"]\n",
        service(
            "x",
            &["tcp://127.0.0.1:0", "unix:{dir}/x.sock"],
            "exec",
            &extra
        )
    )
    .replace("{dir}", dir.path().to_str().unwrap());
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("-c").arg(&path);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    d
}

fn v1(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

fn v2(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    let mut addrs = Vec::new();
    match (s, d) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11); // TCP over IPv4
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21);
            addrs.extend_from_slice(&s.ip().octets());
            addrs.extend_from_slice(&d.ip().octets());
        }
        _ => panic!("one family"),
    }
    addrs.extend_from_slice(&s.port().to_be_bytes());
    addrs.extend_from_slice(&d.port().to_be_bytes());
    // A TLV (NOOP) too: the parser must step over it.
    addrs.extend_from_slice(&[0x04, 0, 2, 0xAA, 0xBB]);
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

/// A v2 LOCAL header (a balancer's own health check).
fn v2_local() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0, 0]);
    h
}

/// Sends `bytes` (header, then a line) and reads the whole answer.
fn ask(mut s: impl Read + Write, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(bytes)?;
    read_to_eof(&mut s)
}

fn env_of(out: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn refused(d: &Daemon) -> u64 {
    status_workers(&status(d), "x")
        .iter()
        .map(|w| w["refused"].as_u64().expect("refused in status"))
        .sum()
}

#[test]
fn headers_name_the_client_in_both_modes() {
    for mode in ["threads", "async"] {
        headers_name_the_client(mode);
    }
}

fn headers_name_the_client(mode: &str) {
    let d = start(mode, "any", "\"127.0.0.0/8\"");
    let addr = d.addr("tcp", "x");
    let sock = d.path("x.sock");
    let cases: [(&str, Vec<u8>, &str, &str); 3] = [
        (
            "v1",
            v1("192.0.2.7:4711", "198.51.100.1:80"),
            "192.0.2.7",
            "198.51.100.1",
        ),
        (
            "v2",
            v2("192.0.2.8:4712", "198.51.100.1:80"),
            "192.0.2.8",
            "198.51.100.1",
        ),
        (
            "v2 IPv6",
            v2("[2001:db8::9]:4713", "[2001:db8::1]:443"),
            "2001:db8::9",
            "2001:db8::1",
        ),
    ];
    for (what, header, client, front) in &cases {
        for unix in [false, true] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(format!("hello {what}\n").as_bytes());
            let out = if unix {
                ask(connect_unix(&sock).unwrap(), &bytes)
            } else {
                ask(connect(addr).unwrap(), &bytes)
            }
            .unwrap_or_else(|e| panic!("{mode} {what} unix={unix}: {e}; log:\n{}", d.log_text()));
            let env = env_of(&out);
            let at = format!("{mode}, {what}, unix listener: {unix}: {env:?}");
            assert_eq!(env.get("PROTO").map(String::as_str), Some("TCP"), "{at}");
            assert_eq!(env["TCPREMOTEIP"], *client, "{at}");
            assert_eq!(env["TCPLOCALIP"], *front, "{at}");
            assert_eq!(env["LINE"], format!("hello {what}"), "{at}");
        }
    }
    // The ports too.
    let out = ask(
        connect(addr).unwrap(),
        &[v1("192.0.2.7:4711", "198.51.100.1:80"), b"x\n".to_vec()].concat(),
    )
    .unwrap();
    let env = env_of(&out);
    assert_eq!(
        (env["TCPREMOTEPORT"].as_str(), env["TCPLOCALPORT"].as_str()),
        ("4711", "80"),
        "{mode}: {env:?}"
    );

    // The scoreboard shows the header's client while it is served.
    let mut held = connect(addr).unwrap();
    held.write_all(&v1("192.0.2.7:4711", "198.51.100.1:80"))
        .unwrap();
    let peers = wait_for(DEADLINE, || {
        let v = status(&d);
        let peers: Vec<String> = status_workers(&v, "x")
            .iter()
            .flat_map(|w| w["connections"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["peer"].as_str().map(String::from))
            .collect();
        (!peers.is_empty()).then_some(peers)
    })
    .unwrap_or_else(|| panic!("{mode}: no connection in status"));
    assert_eq!(peers, ["192.0.2.7:4711"], "{mode}");
    drop(held);

    // LOCAL (a health check through the balancer): the socket's own peer.
    let s = connect(addr).unwrap();
    let me = s.local_addr().unwrap();
    let env = env_of(&ask(s, &[v2_local(), b"check\n".to_vec()].concat()).unwrap());
    assert_eq!(env["TCPREMOTEIP"], me.ip().to_string(), "{mode}: {env:?}");
    assert_eq!(
        env["TCPREMOTEPORT"],
        me.port().to_string(),
        "{mode}: {env:?}"
    );

    // `deny` applies to the header's client, and counts.
    let before = refused(&d);
    let out = ask(
        connect(addr).unwrap(),
        &[v2("192.0.2.66:5000", "198.51.100.1:80"), b"x\n".to_vec()].concat(),
    );
    assert!(
        out.as_ref().map_or(true, |o| o.is_empty()),
        "{mode}: a denied client was served: {out:?}"
    );
    d.wait_log("denied by 192.0.2.66");
    assert!(refused(&d) > before, "{mode}: the refusal was not counted");
}

#[test]
fn bad_headers_are_cut_and_counted_in_both_modes() {
    for mode in ["threads", "async"] {
        bad_headers_are_cut(mode);
    }
}

fn bad_headers_are_cut(mode: &str) {
    let d = start(mode, "v2", "\"127.0.0.0/8\"");
    let addr = d.addr("tcp", "x");
    let cut = |bytes: &[u8], what: &str| {
        let out = ask(connect(addr).unwrap(), bytes);
        assert!(
            out.as_ref().map_or(true, |o| o.is_empty()),
            "{mode}: {what} was served: {out:?}"
        );
    };
    cut(b"GET / HTTP/1.0\r\n\r\n", "no header");
    d.wait_log("does not start with a PROXY protocol v2 header");
    cut(
        &[v1("192.0.2.7:1", "198.51.100.1:80"), b"x\n".to_vec()].concat(),
        "a v1 header to a v2 service",
    );
    let mut huge = v2("192.0.2.7:1", "198.51.100.1:80");
    huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
    cut(&huge, "a v2 header announcing 60 kB");
    // Slow: half a header, then nothing: cut after the header's bound
    // (5 s), while the worker serves others meanwhile.
    let mut slow = connect(addr).unwrap();
    slow.write_all(&v2("192.0.2.7:1", "198.51.100.1:80")[..20])
        .unwrap();
    let t = Instant::now();
    if mode == "async" {
        let out = ask(
            connect(addr).unwrap(),
            &[
                v2("192.0.2.9:2", "198.51.100.1:80"),
                b"meanwhile\n".to_vec(),
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(env_of(&out)["TCPREMOTEIP"], "192.0.2.9");
    }
    let rest = read_to_eof(&mut slow);
    assert!(
        rest.as_ref().map_or(true, |o| o.is_empty()),
        "{mode}: the slow header got {rest:?}"
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(9),
        "{mode}: the slow header was cut after {took:?}, not at its 5 s bound"
    );
    d.wait_log("no complete PROXY header within 5s");
    // All counted (the log is limited to a line a second; the counts are
    // not).
    let n = wait_for(DEADLINE, || {
        let n = refused(&d);
        (n >= 4).then_some(n)
    });
    assert!(
        n.is_some(),
        "{mode}: {} refusals counted, not 4",
        refused(&d)
    );
}

#[test]
fn a_header_from_outside_proxy_from_is_refused() {
    for mode in ["threads", "async"] {
        // Loopback is not a balancer here.
        let d = start(mode, "any", "\"192.0.2.0/24\"");
        let addr = d.addr("tcp", "x");
        let out = ask(
            connect(addr).unwrap(),
            &[v1("203.0.113.5:1", "198.51.100.1:80"), b"x\n".to_vec()].concat(),
        );
        assert!(
            out.as_ref().map_or(true, |o| o.is_empty()),
            "{mode}: served: {out:?}"
        );
        d.wait_log("may not send a PROXY header (not in proxy_from)");
        assert_eq!(refused(&d), 1, "{mode}");
        // A Unix peer is trusted: its socket file's permissions say who.
        let out = ask(
            connect_unix(&d.path("x.sock")).unwrap(),
            &[v1("203.0.113.5:1", "198.51.100.1:80"), b"x\n".to_vec()].concat(),
        )
        .unwrap();
        assert_eq!(env_of(&out)["TCPREMOTEIP"], "203.0.113.5", "{mode}");
    }
}

/// HAProxy, started from a config in the daemon's dir; killed on drop.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have_haproxy() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// HAProxy on a free loopback port in front of `backend`, with `send`
/// (send-proxy or send-proxy-v2) on its server line.
fn haproxy(dir: &Path, backend: SocketAddr, send: &str) -> (Haproxy, SocketAddr) {
    let cfg = dir.join(format!("haproxy-{send}.cfg"));
    let mut last = String::new();
    for _ in 0..5 {
        let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        std::fs::write(
            &cfg,
            format!(
                "global\n    log stderr format raw local0 warning\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 10s\n    timeout server 10s\n\
                 frontend f\n    bind {front}\n    default_backend b\n\
                 backend b\n    server s1 {backend} {send}\n"
            ),
        )
        .unwrap();
        let log = dir.join(format!("haproxy-{send}.log"));
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("haproxy");
        let mut h = Haproxy(child);
        let up = wait_for(DEADLINE, || {
            if let Ok(Some(_)) = h.0.try_wait() {
                return Some(false); // exited: the port was taken meanwhile
            }
            std::net::TcpStream::connect(front).is_ok().then_some(true)
        });
        if up == Some(true) {
            return (h, front);
        }
        last = std::fs::read_to_string(&log).unwrap_or_default();
    }
    panic!("haproxy did not start: {last}");
}

/// A client connecting from `from` (another loopback address than
/// HAProxy's own, so that the two cannot be confused).
fn connect_from(from: &str, to: SocketAddr) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&from.parse::<SocketAddr>().unwrap().into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn haproxy_sends_the_client_through() {
    if !have_haproxy() {
        eprintln!("skipped: haproxy not installed (apt-get install haproxy)");
        return;
    }
    for mode in ["threads", "async"] {
        // Only HAProxy (127.0.0.1) may send headers; the client is
        // 127.0.0.2.
        let d = start(mode, "any", "\"127.0.0.1\"");
        let addr = d.addr("tcp", "x");
        for send in ["send-proxy", "send-proxy-v2"] {
            let (_h, front) = haproxy(d.dir.path(), addr, send);
            let s = connect_from("127.0.0.2:0", front);
            let me = s.local_addr().unwrap();
            let out = ask(s, b"via haproxy\n")
                .unwrap_or_else(|e| panic!("{mode} {send}: {e}; log:\n{}", d.log_text()));
            let env = env_of(&out);
            let at = format!("{mode} {send}: {env:?}");
            assert_eq!(env["LINE"], "via haproxy", "{at}");
            assert_eq!(env["TCPREMOTEIP"], "127.0.0.2", "{at}");
            assert_eq!(env["TCPREMOTEPORT"], me.port().to_string(), "{at}");
            assert_eq!(env["TCPLOCALPORT"], front.port().to_string(), "{at}");
        }
        // The client straight to preforkd, without HAProxy: loopback
        // 127.0.0.2 is not in proxy_from.
        let out = ask(connect_from("127.0.0.2:0", addr), b"x\n");
        assert!(
            out.as_ref().map_or(true, |o| o.is_empty()),
            "{mode}: served without a header: {out:?}"
        );
    }
}
