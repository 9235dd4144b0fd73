//! Access control (`allow`, `deny`) and `max_connections_per_ip`, on the
//! real binary serving the built-in echo.
//!
//! This file has its own `main` (`harness = false` in Cargo.toml): with
//! `ACL_TEST_CONNECT=PATH` in its environment the test binary is a client
//! that connects to the Unix socket PATH, sends one line and says by its
//! exit status whether it was echoed ([`SERVED`]) or the connection was
//! closed at once ([`REFUSED`]). The Unix peer tests start it as another
//! uid (root only). Otherwise `main` runs the tests one after another.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Turns this binary into the Unix socket client.
const CLIENT_ENV: &str = "ACL_TEST_CONNECT";
/// The client's exit status when its line was echoed.
const SERVED: i32 = 0;
/// When the connection was closed (or reset) without an answer.
const REFUSED: i32 = 3;
/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// What happened to a connection that sent one line.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The line came back.
    Served,
    /// Closed or reset before any answer.
    Refused,
}

/// Sends a line and reads the answer: echoed, or closed at once.
fn exchange<S: Read + Write>(mut s: S) -> io::Result<Outcome> {
    let line = b"ping\n";
    match s.write_all(line) {
        Ok(()) => {}
        Err(e) if gone(&e) => return Ok(Outcome::Refused),
        Err(e) => return Err(e),
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < line.len() {
        match s.read(&mut buf) {
            Ok(0) => return Ok(Outcome::Refused),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if gone(&e) => return Ok(Outcome::Refused),
            Err(e) => return Err(e),
        }
    }
    assert_eq!(got, line, "not an echo");
    Ok(Outcome::Served)
}

fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// A TCP connection to `to` from the local address `from` (loopback has
/// all of 127/8).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let from = SocketAddr::new(from.parse().unwrap(), 0);
    let domain = socket2::Domain::for_address(from);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    s.bind(&from.into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One line's fate on a new connection from `from` to `to`.
fn try_from(from: &str, to: SocketAddr) -> Outcome {
    exchange(connect_from(from, to)).unwrap_or_else(|e| panic!("{from} -> {to}: {e}"))
}

/// The same over a Unix socket, as this process's user.
fn try_unix(path: &Path) -> Outcome {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange(s).unwrap()
}

/// Connections refused so far by the workers of `service`.
fn refused(d: &Daemon, service: &str) -> u64 {
    status_workers(&status(d), service)
        .iter()
        .map(|w| w["refused"].as_u64().expect("refused in status"))
        .sum()
}

/// Control socket for status and reload; `services` after it.
fn config(services: &str) -> String {
    format!("[control]\nsocket = \"{{dir}}/control.sock\"\n\n{services}")
}

fn allow_and_deny_ipv4() {
    let d = Daemon::start(&config(
        &(service(
            "only1",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\nallow = [\"127.0.0.1\"]",
        ) + &service(
            "not2",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 1\ndeny = [\"127.0.0.2/32\", \"10.0.0.0/8\"]",
        )),
    ));
    d.wait_ready();
    let (only1, not2) = (d.addr("tcp", "only1"), d.addr("tcp", "not2"));
    assert_eq!(try_from("127.0.0.1", only1), Outcome::Served);
    let t = Instant::now();
    assert_eq!(try_from("127.0.0.2", only1), Outcome::Refused);
    assert!(t.elapsed() < Duration::from_secs(5), "not closed at once");
    assert_eq!(try_from("127.0.0.3", only1), Outcome::Refused);
    assert_eq!(try_from("127.0.0.1", not2), Outcome::Served);
    assert_eq!(try_from("127.0.0.3", not2), Outcome::Served);
    assert_eq!(try_from("127.0.0.2", not2), Outcome::Refused);
    d.wait_log("refused 127.0.0.2:");
    d.wait_log(": denied by 127.0.0.2");
    // The refusals are counted, and nothing else is.
    assert_eq!(refused(&d, "only1"), 2);
    assert_eq!(refused(&d, "not2"), 1);
    let served: u64 = status_workers(&status(&d), "only1")
        .iter()
        .map(|w| w["served"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 1, "a refused connection is not served");
    // The table shows the column.
    let table = stdout(&cli(&d, &["status"]));
    assert!(table.contains("REFUSED"), "{table}");
}

fn allow_and_deny_ipv6() {
    if !have_ipv6() {
        eprintln!("skipped allow_and_deny_ipv6: this machine cannot bind [::1]");
        return;
    }
    let d = Daemon::start(&config(
        &(service(
            "v6ok",
            &["tcp://[::1]:0"],
            "echo",
            "allow = [\"::1\", \"2001:db8::/32\"]",
        ) + &service(
            "v6no",
            &["tcp://[::1]:0"],
            "echo",
            "allow = [\"::/0\"]\ndeny = [\"::1/128\"]",
        ) + &service(
            "v4only",
            &["tcp://[::1]:0"],
            "echo",
            "allow = [\"127.0.0.0/8\"]",
        )),
    ));
    d.wait_ready();
    assert_eq!(try_from("::1", d.addr("tcp", "v6ok")), Outcome::Served);
    assert_eq!(try_from("::1", d.addr("tcp", "v6no")), Outcome::Refused);
    assert_eq!(try_from("::1", d.addr("tcp", "v4only")), Outcome::Refused);
    d.wait_log("refused [::1]:");
    d.wait_log("denied by ::1");
    d.wait_log("not in allow");
    assert_eq!(refused(&d, "v6no"), 1);
}

/// Runs this binary as the Unix client, as `uid` (and gid).
fn unix_client_as(path: &Path, uid: u32) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .env(CLIENT_ENV, path)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_for(DEADLINE, || child.try_wait().unwrap()).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("the client did not finish")
    });
    match status.code() {
        Some(SERVED) => Outcome::Served,
        Some(REFUSED) => Outcome::Refused,
        _ => panic!("the client as uid {uid} failed: {status}"),
    }
}

fn unix_peers_by_uid() {
    // SAFETY: geteuid(2) cannot fail and has no memory effects.
    let me = unsafe { libc::geteuid() };
    let d = Daemon::start(&config(
        &(service(
            "mine",
            &["unix:{dir}/mine.sock"],
            "echo",
            &format!("socket_mode = \"0666\"\nallow = [\"uid:{me}\"]"),
        ) + &service(
            "notme",
            &["unix:{dir}/notme.sock"],
            "echo",
            &format!("socket_mode = \"0666\"\ndeny = [\"uid:{me}\"]"),
        ) + &service(
            "anyunix",
            &["unix:{dir}/any.sock", "tcp://127.0.0.1:0"],
            "echo",
            "allow = [\"unix\"]",
        )),
    ));
    d.wait_ready();
    assert_eq!(try_unix(&d.path("mine.sock")), Outcome::Served);
    assert_eq!(try_unix(&d.path("notme.sock")), Outcome::Refused);
    d.wait_log(&format!("denied by uid:{me}"));
    assert_eq!(try_unix(&d.path("any.sock")), Outcome::Served);
    assert_eq!(
        try_from("127.0.0.1", d.addr("tcp", "anyunix")),
        Outcome::Refused,
        "\"unix\" allows no TCP peer"
    );
    if me != 0 {
        eprintln!(
            "skipped the other-uid half of unix_peers_by_uid: running a client as nobody needs root"
        );
        return;
    }
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        unix_client_as(&d.path("mine.sock"), NOBODY),
        Outcome::Refused
    );
    assert_eq!(
        unix_client_as(&d.path("notme.sock"), NOBODY),
        Outcome::Served
    );
    d.wait_log("refused unix:(unnamed): not in allow");
    assert_eq!(refused(&d, "mine"), 1);
}

fn max_connections_per_ip_across_workers() {
    // Two workers of one thread: with the first busy on a connection, the
    // second connection can only land on the other worker, so the limit is
    // counted across workers.
    let d = Daemon::start(&config(&service(
        "limited",
        &["tcp://127.0.0.1:0"],
        "echo",
        "workers = 2\nmax_connections_per_ip = 1",
    )));
    d.wait_ready();
    let addr = d.addr("tcp", "limited");
    let mut held = connect_from("127.0.0.1", addr);
    assert_eq!(exchange(&mut held).unwrap(), Outcome::Served);
    assert_eq!(try_from("127.0.0.1", addr), Outcome::Refused);
    d.wait_log("2 connections from 127.0.0.1 (max_connections_per_ip = 1)");
    // Another address gets in meanwhile (on the other worker).
    let mut other = connect_from("127.0.0.2", addr);
    assert_eq!(exchange(&mut other).unwrap(), Outcome::Served);
    let v = status(&d);
    let peers: Vec<String> = status_workers(&v, "limited")
        .iter()
        .flat_map(|w| w["connections"].as_array().unwrap().iter())
        .map(|c| c["peer"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(peers.len(), 2, "{v:#}");
    assert!(
        peers.iter().any(|p| p.starts_with("127.0.0.1:")),
        "{peers:?}"
    );
    assert!(
        peers.iter().any(|p| p.starts_with("127.0.0.2:")),
        "{peers:?}"
    );
    drop(other);
    // Once the held one ends, 127.0.0.1 gets in again.
    drop(held);
    let again = wait_for(DEADLINE, || {
        (try_from("127.0.0.1", addr) == Outcome::Served).then_some(())
    });
    assert!(
        again.is_some(),
        "127.0.0.1 still refused:\n{}",
        d.log_text()
    );
    assert!(refused(&d, "limited") >= 1);
}

fn reload_changes_the_lists() {
    let svc = |allow: &str| {
        config(&service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            &format!("workers = 2\nallow = [\"{allow}\"]"),
        ))
    };
    let d = Daemon::start(&svc("127.0.0.1"));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    assert_eq!(try_from("127.0.0.1", addr), Outcome::Served);
    assert_eq!(try_from("127.0.0.2", addr), Outcome::Refused);
    d.write_config(&svc("127.0.0.2"));
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_status(&d, "generation 2 settled", |v| {
        v["generation"] == 2 && settled(v)
    });
    assert_eq!(try_from("127.0.0.2", addr), Outcome::Served);
    assert_eq!(try_from("127.0.0.1", addr), Outcome::Refused);
    // A bad entry fails the reload with file:line:col; the lists in force
    // stay.
    d.write_config(&svc("127.0.0.300"));
    let out = cli(&d, &["reload"]);
    assert!(!out.status.success(), "{}", show(&out));
    let text = stderr(&out) + &stdout(&out);
    assert!(
        text.contains(
            "preforkd.toml:8:10: service \"echo\": allow: invalid address \"127.0.0.300\""
        ),
        "{}",
        show(&out)
    );
    assert_eq!(try_from("127.0.0.2", addr), Outcome::Served);
}

/// The client mode: exit [`SERVED`] or [`REFUSED`].
fn client(path: &str) -> ! {
    let s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect {path}: {e}");
            std::process::exit(2);
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match exchange(s) {
        Ok(Outcome::Served) => std::process::exit(SERVED),
        Ok(Outcome::Refused) => std::process::exit(REFUSED),
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(2);
        }
    }
}

fn main() {
    if let Some(path) = std::env::var_os(CLIENT_ENV) {
        client(path.to_str().unwrap());
    }
    let tests: [(&str, fn()); 6] = [
        ("allow_and_deny_ipv4", allow_and_deny_ipv4),
        ("allow_and_deny_ipv6", allow_and_deny_ipv6),
        ("unix_peers_by_uid", unix_peers_by_uid),
        (
            "max_connections_per_ip_across_workers",
            max_connections_per_ip_across_workers,
        ),
        ("reload_changes_the_lists", reload_changes_the_lists),
        (
            "max_connections_per_ip_keeps_another_address_served_under_a_slowloris_flood",
            max_connections_per_ip_keeps_another_address_served_under_a_slowloris_flood,
        ),
    ];
    run_tests(&tests);
}

/// Slowloris in threads mode (docs/HARDENING.md): 2 workers × 4 threads
/// cannot hold a flood of slow clients, and a normal client waits behind
/// them; `max_connections_per_ip` is the remedy. Under a flood of 200
/// clients from 127.0.0.1 that send one byte and then nothing, a client
/// from 127.0.0.2 is served at once.
fn max_connections_per_ip_keeps_another_address_served_under_a_slowloris_flood() {
    let d = Daemon::start(&config(&service(
        "limited",
        &["tcp://127.0.0.1:0"],
        "echo",
        "workers = 2\nthreads = 4\nmax_connections_per_ip = 2",
    )));
    d.wait_ready();
    let addr = d.addr("tcp", "limited");
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = connect_from("127.0.0.1", addr);
            let _ = std::io::Write::write_all(&mut s, b"x");
            s
        })
        .collect();
    d.wait_log("(max_connections_per_ip = 2)");
    let t = std::time::Instant::now();
    let mut other = connect_from("127.0.0.2", addr);
    assert_eq!(exchange(&mut other).unwrap(), Outcome::Served);
    eprintln!("127.0.0.2 served under the flood in {:?}", t.elapsed());
    drop(flood);
}
