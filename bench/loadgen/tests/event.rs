//! End-to-end, what only the epoll engine does: several loops, thousands
//! of connections on one loop, hold mode (served, and failed by a server
//! that drops idle connections), closes at a request boundary that are not
//! errors, wrong echoes that are, and the descriptor limit raised and
//! checked.

mod common;

use common::{echo, field, flag, loadgen, loadgen_cmd, run, stdout, tcp_echo, tcp_server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::time::Duration;

#[test]
fn loops_share_the_connections() {
    let addr = tcp_echo();
    let (o, took) = loadgen(
        &[
            "rr", "--tcp", &addr, "-c", "7", "--loops", "3", "-d", "1", "--json",
        ],
        Duration::from_secs(10),
    );
    let j = stdout(&o);
    assert_eq!(field(&j, "loops"), 3.0, "{j}");
    assert!(field(&j, "requests") > 100.0, "{j}");
    assert_eq!(field(&j, "errors_total"), 0.0, "{j}");
    assert_eq!(
        field(&j, "starved"),
        0.0,
        "every connection, on every loop: {j}"
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn thousands_of_connections_on_one_loop() {
    // The test's server holds a descriptor per connection, loadgen another.
    let limit = common::raise_nofile();
    let n: u64 = 2000;
    if limit < n + 200 {
        eprintln!(
            "skipped: RLIMIT_NOFILE's hard limit is {limit}, this test needs {}",
            n + 200
        );
        return;
    }
    let addr = tcp_echo();
    let (o, took) = loadgen(
        &[
            "rr",
            "--tcp",
            &addr,
            "-c",
            &n.to_string(),
            "-d",
            "1",
            "--warmup",
            "2",
            "--timeout-ms",
            "10000",
            "--json",
        ],
        Duration::from_secs(30),
    );
    let j = stdout(&o);
    assert_eq!(field(&j, "errors_total"), 0.0, "{j}");
    assert_eq!(field(&j, "starved"), 0.0, "every one served: {j}");
    assert_eq!(
        field(&j, "connects"),
        0.0,
        "all connected in the warm-up: {j}"
    );
    assert!(field(&j, "requests") >= n as f64, "{j}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn hold_serves_every_connection() {
    let addr = tcp_echo();
    let (o, took) = loadgen(
        &["hold", "--tcp", &addr, "-c", "300", "-d", "0.5", "--json"],
        Duration::from_secs(20),
    );
    let j = stdout(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("loadgen hold: 300 of 300 connections open and answered; idle for 0.5 s"),
        "{err}"
    );
    assert_eq!(field(&j, "held"), 300.0, "{j}");
    assert_eq!(field(&j, "served"), 300.0, "{j}");
    assert!(flag(&j, "all_served"), "{j}");
    // Two round trips on each connection, one connect each.
    assert_eq!(field(&j, "requests"), 600.0, "{j}");
    assert_eq!(field(&j, "connects"), 300.0, "{j}");
    assert_eq!(field(&j, "errors_total"), 0.0, "{j}");
    assert_eq!(field(&j, "starved"), 0.0, "{j}");
    assert!(took >= Duration::from_millis(500), "no idle time: {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// Echo one message, then close: a server that drops idle connections.
fn echo_once(mut s: TcpStream) {
    let mut buf = [0u8; 64];
    if s.read_exact(&mut buf).is_ok() {
        s.write_all(&buf).ok();
    }
}

#[test]
fn hold_fails_when_the_server_drops_idle_connections() {
    let addr = tcp_server(echo_once);
    let (o, took) = loadgen(
        &[
            "hold",
            "--tcp",
            &addr,
            "-c",
            "20",
            "-d",
            "0.3",
            "--json",
            "--fail-on-error",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(o.status.code(), Some(1), "--fail-on-error and none served");
    let j = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(field(&j, "held"), 20.0, "each answered once: {j}");
    assert_eq!(field(&j, "served"), 0.0, "{j}");
    assert!(!flag(&j, "all_served"), "{j}");
    assert_eq!(field(&j, "eof_early"), 20.0, "each close counted once: {j}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// Echo three messages, then close at the request boundary (as a server
/// that recycles its connections does).
fn echo_three(mut s: TcpStream) {
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        if s.read_exact(&mut buf).is_err() || s.write_all(&buf).is_err() {
            return;
        }
    }
}

/// Echo every message with its first byte changed.
fn echo_wrong(mut s: TcpStream) {
    let mut buf = [0u8; 64];
    while s.read_exact(&mut buf).is_ok() {
        buf[0] ^= 1;
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

#[test]
fn idle_closes_are_not_errors_and_wrong_echoes_are() {
    let addr = tcp_server(echo_three);
    let (o, _) = loadgen(
        &["rr", "--tcp", &addr, "-c", "4", "-d", "1", "--json"],
        Duration::from_secs(10),
    );
    let j = stdout(&o);
    assert_eq!(field(&j, "errors_total"), 0.0, "{j}");
    let (requests, idle) = (field(&j, "requests"), field(&j, "server_closed_idle"));
    assert!(requests > 30.0, "{j}");
    // One close per three requests, give or take the window's ends.
    assert!(
        (idle - requests / 3.0).abs() <= 8.0,
        "closes {idle} for {requests} requests: {j}"
    );
    assert!(field(&j, "connects") >= idle, "a reconnect after each: {j}");

    let addr = tcp_server(echo_wrong);
    let (o, _) = loadgen(
        &[
            "rr",
            "--tcp",
            &addr,
            "-c",
            "2",
            "-d",
            "0.5",
            "--json",
            "--fail-on-error",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(o.status.code(), Some(1));
    let j = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(field(&j, "requests"), 0.0, "{j}");
    assert!(field(&j, "mismatch") >= 2.0, "{j}");
}

#[test]
fn the_descriptor_limit_is_raised_and_checked() {
    let addr = tcp_echo();
    common::raise_nofile();
    // A soft limit of 256 under a hard one of 2048: loadgen raises it and
    // runs 1000 connections.
    let mut cmd = loadgen_cmd(&["hold", "--tcp", &addr, "-c", "1000", "-d", "0.1", "--json"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between
    // fork and exec.
    unsafe {
        cmd.pre_exec(|| limit_nofile(256, 2048));
    }
    let (o, _) = run(cmd, Duration::from_secs(30));
    let j = stdout(&o);
    assert!(flag(&j, "all_served"), "{j}");

    // A hard limit of 512 cannot hold 1000: refused, in one line that
    // names the limit, before any connect.
    let mut cmd = loadgen_cmd(&["rr", "--tcp", &addr, "-c", "1000", "-d", "1"]);
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(|| limit_nofile(512, 512));
    }
    let (o, took) = run(cmd, Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("-c 1000 needs about") && err.contains("RLIMIT_NOFILE allows 512"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// In a child before exec: set RLIMIT_NOFILE.
fn limit_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: a valid rlimit; setrlimit is async-signal-safe.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn an_echo_over_a_unix_socket_in_hold_mode() {
    let path = std::env::temp_dir().join(format!("loadgen-hold-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || echo(s));
        }
    });
    let (o, _) = loadgen(
        &[
            "hold",
            "--unix",
            path.to_str().unwrap(),
            "-c",
            "50",
            "-d",
            "0.2",
            "--json",
        ],
        Duration::from_secs(20),
    );
    std::fs::remove_file(&path).ok();
    let j = stdout(&o);
    assert!(flag(&j, "all_served"), "{j}");
    assert_eq!(field(&j, "errors_total"), 0.0, "{j}");
}
