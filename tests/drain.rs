//! Leaving without losing a client: a graceful stop serves every
//! connection the kernel had queued (TCP and Unix, threads and async
//! workers), resets nobody under a connect loop, and `shutdown_delay`
//! keeps serving while `/ready` says 503 so that a load balancer takes the
//! host out first; `/live` follows the master's heartbeat.
//!
//! Needs nothing installed: the clients are the test's own.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const CONTROL: &str = "[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// One worker that serves one connection at a time (threads mode: one
/// thread; async: `worker_connections = 1`), so that connections queue.
fn one_at_a_time(mode: &str) -> &'static str {
    match mode {
        "threads" => "workers = 1\nthreads = 1\ngraceful_timeout = \"20s\"",
        _ => "mode = \"async\"\nworkers = 1\nworker_connections = 1\ngraceful_timeout = \"20s\"",
    }
}

fn start_echo(extra: &str, head: &str) -> (Daemon, SocketAddr, PathBuf) {
    let config = format!(
        "{head}{}",
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
    let sock = d.path("echo.sock");
    (d, addr, sock)
}

/// The accept queue of the TCP listener on `port` (LISTEN sockets show it
/// as rx_queue in /proc/net/tcp).
fn listen_queue(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let lport = u16::from_str_radix(f[1].rsplit_once(':')?.1, 16).ok()?;
            let rx = usize::from_str_radix(f[4].split_once(':')?.1, 16).ok()?;
            (lport == port && f[3] == "0A").then_some(rx)
        })
        .sum()
}

#[test]
fn queued_connections_are_served_at_a_stop() {
    for mode in ["threads", "async"] {
        queued_connections_are_served(mode);
    }
}

/// One connection keeps the only serving slot busy; 16 more (8 TCP, 8
/// Unix) sit in the accept queues with their request already sent. At
/// SIGTERM every one of them gets its answer and a clean end of stream:
/// none is reset, none is dropped from a queue.
fn queued_connections_are_served(mode: &str) {
    let (mut d, addr, sock) = start_echo(one_at_a_time(mode), "");
    d.wait_workers(1);
    let mut first = connect(addr).unwrap();
    first.write_all(b"first").unwrap();
    let mut buf = [0u8; 5];
    first.read_exact(&mut buf).unwrap();

    // Each queued client reads its answer on a thread of its own, and
    // closes once it has it, as real clients do (the worker waits for a
    // client's close after its last answer, up to a bound).
    let mut queued = Vec::new();
    for i in 0..16 {
        let unix = i % 2 == 1;
        let msg = format!("queued {i} ({})", if unix { "unix" } else { "tcp" });
        let read: Box<dyn FnOnce() -> std::io::Result<Vec<u8>> + Send> = if unix {
            let mut s = connect_unix(&sock).unwrap();
            s.write_all(msg.as_bytes()).unwrap();
            Box::new(move || read_to_eof(&mut s))
        } else {
            let mut s = connect(addr).unwrap();
            s.write_all(msg.as_bytes()).unwrap();
            Box::new(move || read_to_eof(&mut s))
        };
        queued.push((msg, read));
    }
    // The TCP ones are in the kernel's queue, not served: the one slot is
    // busy with the first connection.
    wait_for(DEADLINE, || (listen_queue(addr.port()) == 8).then_some(())).unwrap_or_else(|| {
        panic!(
            "{mode}: {} queued instead of 8; log:\n{}",
            listen_queue(addr.port()),
            d.log_text()
        )
    });
    let readers: Vec<_> = queued
        .into_iter()
        .map(|(msg, read)| (msg, std::thread::spawn(read)))
        .collect();

    d.signal(libc::SIGTERM);
    let rest = read_to_eof(&mut first).unwrap_or_else(|e| panic!("{mode}: first: {e}"));
    assert_eq!(
        rest, b"",
        "{mode}: the first connection got data it did not ask for"
    );
    drop(first);
    for (msg, reader) in readers {
        let got = reader.join().unwrap().unwrap_or_else(|e| {
            panic!(
                "{mode}: {msg:?} was lost at the stop ({e}); log:\n{}",
                d.log_text()
            )
        });
        assert_eq!(
            String::from_utf8_lossy(&got),
            msg,
            "{mode}: {msg:?} got another answer; log:\n{}",
            d.log_text()
        );
    }
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{mode}: log:\n{}", d.log_text());
    assert!(
        !d.log_text().contains("SIGKILL"),
        "{mode}: {}",
        d.log_text()
    );
}

/// What one connect-loop client saw.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    served: usize,
    /// Not let in: refused, no such socket, or a SYN left unanswered.
    refused: usize,
    /// Let in, then reset or cut before the whole answer: a loss.
    reset: usize,
    early_eof: usize,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.served += o.served;
        self.refused += o.refused;
        self.reset += o.reset;
        self.early_eof += o.early_eof;
    }
}

/// One exchange of a connect-loop client: connect, send, read the echo,
/// close. What went wrong is sorted into `t`.
fn exchange(connect: &dyn Fn() -> std::io::Result<Box<dyn ReadWrite>>, msg: &[u8], t: &mut Tally) {
    let mut s = match connect() {
        Ok(s) => s,
        Err(e) if not_let_in(&e) => {
            t.refused += 1;
            return;
        }
        Err(e) => panic!("connect failed: {e}"),
    };
    let mut got = vec![0u8; msg.len()];
    match s.write_all(msg).and_then(|()| s.read_exact(&mut got)) {
        Ok(()) if got == msg => t.served += 1,
        Ok(()) => panic!("another answer: {:?}", String::from_utf8_lossy(&got)),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => t.early_eof += 1,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            ) =>
        {
            t.reset += 1
        }
        Err(e) => panic!("exchange failed: {e}"),
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn not_let_in(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::NotFound | ErrorKind::TimedOut
    )
}

/// 16 clients (12 TCP, 4 Unix) connect, send, read and close as fast as
/// they can, through a running daemon and its graceful stop: every client
/// let in is served in full; after the stop they are only kept out.
fn connect_loop_through_a_stop(mode: &str, delay: bool) {
    let pool = match mode {
        "threads" => "workers = 2\nthreads = 4\ngraceful_timeout = \"20s\"",
        _ => "mode = \"async\"\nworkers = 2\ngraceful_timeout = \"20s\"",
    };
    let head = if delay {
        format!(
            "[daemon]\nshutdown_delay = \"2s\"\n\n{CONTROL}[metrics]\nlisten = \"127.0.0.1:0\"\n\n"
        )
    } else {
        String::new()
    };
    let (mut d, addr, sock) = start_echo(pool, &head);
    // The metrics endpoint's root, without /metrics.
    let url = delay.then(|| metrics_url(&d).trim_end_matches("/metrics").to_string());
    if let Some(url) = &url {
        assert_eq!(
            http("GET", &format!("{url}/ready")).0,
            200,
            "{}",
            d.log_text()
        );
    }

    let done = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let served_before = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (done, stopped, served_before) =
                (done.clone(), stopped.clone(), served_before.clone());
            let sock = sock.clone();
            std::thread::spawn(move || {
                let connect: Box<dyn Fn() -> std::io::Result<Box<dyn ReadWrite>>> = if i < 12 {
                    Box::new(move || {
                        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        Ok(Box::new(s) as Box<dyn ReadWrite>)
                    })
                } else {
                    let sock = sock.clone();
                    Box::new(move || {
                        let s = UnixStream::connect(&sock)?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        Ok(Box::new(s) as Box<dyn ReadWrite>)
                    })
                };
                let (mut before, mut after) = (Tally::default(), Tally::default());
                let mut n = 0u64;
                while !done.load(Ordering::SeqCst) {
                    let msg = format!("client {i} exchange {n}");
                    n += 1;
                    // Counted as before the stop only if it ended before
                    // the test set `stopped` (just before SIGTERM).
                    let mut t = Tally::default();
                    exchange(&*connect, msg.as_bytes(), &mut t);
                    if stopped.load(Ordering::SeqCst) {
                        after.add(&t);
                    } else {
                        before.add(&t);
                    }
                    if !stopped.load(Ordering::SeqCst) {
                        served_before.store(before.served, Ordering::Relaxed);
                    }
                }
                (before, after)
            })
        })
        .collect();

    // Under way: every client has been served a few times.
    wait_for(DEADLINE, || {
        (served_before.load(Ordering::Relaxed) >= 3).then_some(())
    })
    .unwrap_or_else(|| panic!("{mode}: the clients are not served; log:\n{}", d.log_text()));
    stopped.store(true, Ordering::SeqCst);
    let stop = Instant::now();
    d.signal(libc::SIGTERM);

    if let Some(url) = &url {
        // The delay: not ready, still serving, no reload.
        let (code, _, body) = wait_for(DEADLINE, || {
            let r = http("GET", &format!("{url}/ready"));
            (r.0 == 503).then_some(r)
        })
        .unwrap();
        assert!(
            code == 503 && body.starts_with("not ready: shutdown delay (stopping in "),
            "{mode}: /ready in the delay: {code} {body:?}"
        );
        let st = status(&d);
        assert_eq!(st["state"], "shutdown delay", "{st}");
        let out = cli(&d, &["reload"]);
        assert!(
            !out.status.success(),
            "a reload in the delay: {}",
            show(&out)
        );
        assert!(
            show(&out).contains("stopping"),
            "the refusal says why: {}",
            show(&out)
        );
        echo_once(addr, b"in the delay").unwrap_or_else(|e| panic!("{mode}: {e}"));
    }

    let status = d.wait_exit(DEADLINE);
    let took = stop.elapsed();
    done.store(true, Ordering::SeqCst);
    let (mut before, mut after) = (Tally::default(), Tally::default());
    for c in clients {
        let (b, a) = c.join().unwrap();
        before.add(&b);
        after.add(&a);
    }
    let log = d.log_text();
    assert_eq!(status.code(), Some(0), "{mode}: log:\n{log}");
    assert!(!log.contains("SIGKILL"), "{mode}: {log}");
    assert_eq!(
        (before.refused, before.reset, before.early_eof),
        (0, 0, 0),
        "{mode}: before the stop: {before:?}"
    );
    assert_eq!(
        (after.reset, after.early_eof),
        (0, 0),
        "{mode}: clients lost at the stop: {after:?}; log:\n{log}"
    );
    assert!(after.refused > 0, "{mode}: nobody was kept out: {after:?}");
    eprintln!(
        "{mode} (delay {delay}): before {before:?}, after SIGTERM {after:?}, exit in {took:?}"
    );
    if delay {
        assert!(
            took >= Duration::from_secs(2),
            "{mode}: stopped {took:?} after SIGTERM, inside its delay"
        );
        assert!(after.served > 0, "{mode}: nobody served in the delay");
        assert!(log.contains("shutdown delay over: graceful stop"), "{log}");
    }
}

#[test]
fn a_connect_loop_loses_nothing_at_a_stop() {
    for mode in ["threads", "async"] {
        connect_loop_through_a_stop(mode, false);
    }
}

#[test]
fn the_shutdown_delay_serves_on_while_not_ready() {
    for mode in ["threads", "async"] {
        connect_loop_through_a_stop(mode, true);
    }
}

/// SIGINT (and SIGQUIT) skip the delay: a fast stop, at once.
#[test]
fn sigint_cuts_the_shutdown_delay_short() {
    let head = "[daemon]\nshutdown_delay = \"30s\"\n\n";
    let (mut d, addr, _) = start_echo("workers = 1", head);
    echo_once(addr, b"before").unwrap();
    d.signal(libc::SIGTERM);
    d.wait_log("not ready; serving on for shutdown_delay (30s)");
    echo_once(addr, b"in the delay").unwrap();
    let stop = Instant::now();
    d.signal(libc::SIGINT);
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", d.log_text());
    assert!(
        stop.elapsed() < Duration::from_secs(10),
        "SIGINT took {:?} in a 30 s delay; log:\n{}",
        stop.elapsed(),
        d.log_text()
    );
}

/// `/live` follows the master's loop: 503 once the master has been
/// stopped (SIGSTOP) for several seconds, 200 again once it turns.
#[test]
fn live_follows_the_master_loop() {
    let d = Daemon::start(&format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
    ));
    d.wait_ready();
    let url = metrics_url(&d).trim_end_matches("/metrics").to_string();
    let live = format!("{url}/live");
    let ready = format!("{url}/ready");
    assert_eq!(http("GET", &live).0, 200, "{}", d.log_text());
    let (code, _, body) = http("GET", &ready);
    assert_eq!((code, body.as_str()), (200, "ready\n"), "{}", d.log_text());

    d.signal(libc::SIGSTOP);
    let stale = wait_for(Duration::from_secs(20), || {
        let r = http("GET", &live);
        (r.0 == 503).then_some(r.2)
    });
    d.signal(libc::SIGCONT);
    let body = stale.unwrap_or_else(|| panic!("/live stayed 200 with the master stopped"));
    assert!(body.starts_with("not live"), "{body:?}");
    wait_for(DEADLINE, || (http("GET", &live).0 == 200).then_some(()))
        .unwrap_or_else(|| panic!("/live did not come back; log:\n{}", d.log_text()));
}
