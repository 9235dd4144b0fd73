//! End-to-end: the loadgen binary, on both engines, against small servers
//! started by the test (echo over TCP on 127.0.0.1:0, a Unix socket and
//! UDP; one that never answers), each run short and killed if it overstays.
//! What only the epoll engine does (hold mode, thousands of connections,
//! the descriptor limit) is in tests/event.rs.

mod common;

use common::{echo, field, loadgen, stdout, tcp_echo};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::time::Duration;

/// The stream engines; every stream test runs on both.
const ENGINES: [&str; 2] = ["threads", "epoll"];

#[test]
fn rr_and_connect_over_tcp() {
    let addr = tcp_echo();
    let (o, _) = loadgen(
        &["wait", "--tcp", &addr, "--timeout-ms", "5000"],
        Duration::from_secs(10),
    );
    assert!(o.status.success());
    for engine in ENGINES {
        let (o, took) = loadgen(
            &[
                "rr", "--tcp", &addr, "-c", "4", "-d", "1", "--warmup", "0.2", "--json",
                "--engine", engine,
            ],
            Duration::from_secs(10),
        );
        let j = stdout(&o);
        assert!(j.contains(&format!("\"engine\":\"{engine}\"")), "{j}");
        assert!(field(&j, "requests") > 100.0, "{engine}: {j}");
        assert_eq!(field(&j, "errors_total"), 0.0, "{engine}: {j}");
        assert_eq!(field(&j, "starved"), 0.0, "{engine}: {j}");
        assert!(field(&j, "p99") >= field(&j, "p50"), "{j}");
        assert!(j.contains("\"unit\":\"req/s\""), "{j}");
        assert!(took < Duration::from_secs(4), "{engine} took {took:?}");
        let (o, _) = loadgen(
            &[
                "connect",
                "--tcp",
                &addr,
                "-c",
                "2",
                "-d",
                "1",
                "--src-ips",
                "4",
                "--json",
                "--engine",
                engine,
            ],
            Duration::from_secs(10),
        );
        let j = stdout(&o);
        assert!(field(&j, "requests") > 10.0, "{engine}: {j}");
        assert_eq!(field(&j, "errors_total"), 0.0, "{engine}: {j}");
        // One connect per request, give or take those that straddle the
        // end of the window.
        let (connects, requests) = (field(&j, "connects"), field(&j, "requests"));
        assert!(
            connects >= requests && connects <= requests + 2.0,
            "{engine}: {j}"
        );
    }
}

#[test]
fn rr_over_a_unix_socket_and_udp() {
    let path = std::env::temp_dir().join(format!("loadgen-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || echo(s));
        }
    });
    let p = path.to_str().unwrap();
    for engine in ENGINES {
        let (o, _) = loadgen(
            &[
                "--unix", p, "-c", "3", "-d", "1", "-s", "1000", "--json", "--engine", engine,
            ],
            Duration::from_secs(10),
        );
        let j = stdout(&o);
        assert!(field(&j, "requests") > 100.0, "{engine}: {j}");
        assert_eq!(field(&j, "errors_total"), 0.0, "{engine}: {j}");
    }
    std::fs::remove_file(&path).ok();

    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = u.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = u.recv_from(&mut buf) {
            u.send_to(&buf[..n], from).ok();
        }
    });
    let (o, _) = loadgen(
        &[
            "--udp",
            &addr,
            "-c",
            "2",
            "-d",
            "1",
            "--timeout-ms",
            "200",
            "--json",
        ],
        Duration::from_secs(10),
    );
    let j = stdout(&o);
    assert!(j.contains("\"mode\":\"udp\""), "{j}");
    assert!(field(&j, "requests") > 100.0, "{j}");
}

#[test]
fn a_silent_server_costs_timeouts_not_a_hang() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    // Accept and hold every connection, answer nothing.
    std::thread::spawn(move || {
        let held: Vec<_> = l.incoming().take(64).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    for engine in ENGINES {
        let (o, took) = loadgen(
            &[
                "rr",
                "--tcp",
                &addr,
                "-c",
                "3",
                "-d",
                "1",
                "--timeout-ms",
                "300",
                "--json",
                "--engine",
                engine,
            ],
            Duration::from_secs(10),
        );
        let j = stdout(&o);
        assert_eq!(field(&j, "requests"), 0.0, "{engine}: {j}");
        assert!(field(&j, "timeout") >= 3.0, "{engine}: {j}");
        assert_eq!(field(&j, "starved"), 3.0, "{engine}: {j}");
        assert!(took < Duration::from_secs(3), "{engine} took {took:?}");
    }
    let (o, took) = loadgen(
        &["wait", "--tcp", &addr, "--timeout-ms", "700"],
        Duration::from_secs(10),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("did not echo within 700 ms"));
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn other_addresses_are_refused() {
    for target in [
        ["--tcp", "192.0.2.1:7"],
        ["--udp", "198.51.100.1:7"],
        ["--tcp", "[2001:db8::1]:7"],
    ] {
        let (o, _) = loadgen(&target, Duration::from_secs(5));
        assert_eq!(o.status.code(), Some(2), "{target:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("not a loopback address") && err.lines().count() == 1,
            "{err}"
        );
    }
}
