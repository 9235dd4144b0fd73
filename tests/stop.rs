//! Stopping: SIGTERM drains (new connections refused, every accepted
//! connection finished with a FIN, exit 0 long before `graceful_timeout`),
//! SIGINT and SIGQUIT stop fast, and every stop removes the Unix socket files
//! and the pid file.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

/// An echo service on TCP and a Unix socket, with a pid file.
fn start(extra: &str) -> (Daemon, SocketAddr) {
    let config = format!(
        "[daemon]\npid_file = \"{{dir}}/preforkd.pid\"\n\n{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0", "unix:{dir}/echo.sock"],
            "echo",
            extra
        )
    );
    let d = Daemon::start(&config);
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    d.wait_workers(2);
    // The files the stop must remove are there to begin with.
    let pid = std::fs::read_to_string(d.path("preforkd.pid")).unwrap();
    assert_eq!(pid.trim(), d.pid().to_string());
    let sock = std::fs::symlink_metadata(d.path("echo.sock")).unwrap();
    assert!(sock.file_type().is_socket());
    (d, addr)
}

fn assert_files_removed(d: &Daemon) {
    for f in ["echo.sock", "preforkd.pid"] {
        assert!(
            std::fs::symlink_metadata(d.path(f)).is_err(),
            "{f} is still there after the stop; log:\n{}",
            d.log_text()
        );
    }
}

/// A connection on which one echo round trip was done: a worker has
/// accepted it and now waits, idle, for more.
fn idle_connection(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr).unwrap();
    s.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    s
}

/// A TCP client arriving during a graceful stop is not let in: its SYN
/// goes unanswered (the listener drops new handshakes) until the queue is
/// drained and the listener shut, then it is refused.
fn assert_not_let_in(d: &Daemon, addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::ConnectionRefused) => {}
        other => panic!(
            "a client arriving during the stop got {other:?}; log:\n{}",
            d.log_text()
        ),
    }
}

#[test]
fn sigterm_finishes_accepted_connections_then_exits_0() {
    let (mut d, addr) = start("workers = 2\ngraceful_timeout = \"20s\"");

    // A: served once, now idle. B: 64 KiB sent, nothing read back yet.
    let mut a = idle_connection(addr);
    let mut b = connect(addr).unwrap();
    let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    b.write_all(&sent).unwrap();
    // The other worker has accepted B once part of the echo is back
    // (tests/drain.rs has the connections still queued at the stop).
    wait_for(DEADLINE, || (pending(&b) > 0).then_some(()))
        .unwrap_or_else(|| panic!("B was not accepted; log:\n{}", d.log_text()));

    let stop = Instant::now();
    d.signal(libc::SIGTERM);

    // No new client gets in: the Unix socket refuses at once, a TCP
    // client's SYN is not answered, while A and B keep the master busy.
    let unix = wait_for(DEADLINE, || {
        match UnixStream::connect(d.path("echo.sock")) {
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) => {
                Some(())
            }
            _ => None,
        }
    });
    assert!(unix.is_some(), "the Unix socket still accepts");
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the master exited before the Unix socket refused"
    );
    assert_not_let_in(&d, addr);

    // A: a clean end of stream, not a reset.
    let rest = read_to_eof(&mut a).unwrap_or_else(|e| panic!("A: {e}; log:\n{}", d.log_text()));
    assert_eq!(rest, b"", "A got data it did not ask for");
    // B: every byte it sent, then a clean end of stream.
    let echoed = read_to_eof(&mut b).unwrap_or_else(|e| panic!("B: {e}; log:\n{}", d.log_text()));
    assert_eq!(
        echoed.len(),
        sent.len(),
        "B got back {} of {} bytes",
        echoed.len(),
        sent.len()
    );
    assert!(echoed == sent, "B got back other bytes than it sent");
    drop((a, b));

    // Exit 0, long before graceful_timeout (20 s) and without killing.
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log_text());
    assert!(stop.elapsed() < Duration::from_secs(10));
    let log = d.log_text();
    assert!(log.contains("INFO: SIGTERM: graceful stop"), "log:\n{log}");
    assert_eq!(d.count_log(") exited with status 0"), 2, "log:\n{log}");
    assert!(!log.contains("(recycled)"), "log:\n{log}");
    assert!(!log.contains("SIGKILL"), "log:\n{log}");
    assert!(
        log.contains(&format!("master pid {} exiting", d.pid())),
        "log:\n{log}"
    );
    assert_files_removed(&d);
}

/// SIGINT or SIGQUIT: the master exits 0 within seconds although one worker
/// holds an idle connection and another is stuck writing to a client that
/// does not read, which a graceful stop would wait `graceful_timeout` for.
fn fast_stop(sig: i32, logged: &str) {
    let (mut d, addr) = start("workers = 2\ngraceful_timeout = \"30s\"");
    let mut idle = idle_connection(addr);

    // A client that writes and never reads: the echo fills both socket
    // buffers and the worker blocks writing to it.
    let stuck = connect(addr).unwrap();
    let writer = {
        let mut s = stuck.try_clone().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..1024 {
                if s.write_all(&chunk).is_err() {
                    break; // our buffers are full, or the worker is gone
                }
            }
        })
    };
    wait_for(DEADLINE, || (pending(&stuck) > 0).then_some(()))
        .unwrap_or_else(|| panic!("the writer was not accepted; log:\n{}", d.log_text()));

    let stop = Instant::now();
    d.signal(sig);
    let status = d.wait_exit(DEADLINE);
    let took = stop.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log_text());
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}; log:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains(logged), "log:\n{log}");
    assert!(!log.contains("graceful stop"), "log:\n{log}");
    assert_files_removed(&d);

    // The idle connection ended (its worker is gone), and nothing listens.
    let mut buf = [0u8; 16];
    match idle.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("idle connection after a fast stop: {other:?}"),
    }
    match connect(addr) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("connect after the stop: {other:?}"),
    }
    writer.join().unwrap();
}

#[test]
fn sigint_is_a_fast_stop() {
    fast_stop(libc::SIGINT, "INFO: SIGINT: fast stop");
}

#[test]
fn sigquit_is_a_fast_stop() {
    fast_stop(libc::SIGQUIT, "INFO: SIGQUIT: fast stop");
}

/// Much more than the socket buffers hold is in flight when SIGTERM comes:
/// echo stops at a request boundary (everything it read has been written
/// back), sends FIN and drains the rest. The client gets back an exact
/// prefix of what it sent, then a clean EOF, never a reset, and the worker
/// leaves long before graceful_timeout.
#[test]
fn sigterm_during_a_stream_ends_it_cleanly_at_a_boundary() {
    let (mut d, addr) = start("workers = 2\ngraceful_timeout = \"20s\"");
    let c = connect(addr).unwrap();
    let total = 8 * 1024 * 1024;
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || -> std::io::Result<usize> {
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            let mut sent = 0;
            while sent < total {
                c.write_all(&chunk)?;
                sent += chunk.len();
            }
            c.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        })
    };
    // Let the buffers fill on both sides, then stop.
    wait_for(DEADLINE, || (pending(&c) > 16 * 1024).then_some(()))
        .unwrap_or_else(|| panic!("no echo came back; log:\n{}", d.log_text()));
    let stop = Instant::now();
    d.signal(libc::SIGTERM);
    let mut got = Vec::with_capacity(total);
    let mut reader = &c;
    reader
        .read_to_end(&mut got)
        .expect("a clean EOF, not a reset");
    assert!(
        !got.is_empty() && got.len() <= total,
        "got {} bytes",
        got.len()
    );
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| *b == ((i % (64 * 1024)) % 251) as u8),
        "what came back is not a prefix of what was sent"
    );
    // The writer either finished (the worker drained the rest) or saw the
    // connection end; it never blocks the test.
    let _ = writer.join().unwrap();
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log_text());
    assert!(stop.elapsed() < Duration::from_secs(15));
    assert!(!d.log_text().contains("SIGKILL"), "log:\n{}", d.log_text());
}
