//! `mode = "async"` workers at capacity, on the real binary: thousands of
//! connections on one event loop; connections spread over 2 and 8 workers;
//! a full worker leaves new connections in the queue (counted in
//! `/metrics`); `allow`/`deny` and `max_connections_per_ip` across workers,
//! with thousands of connections; `idle_timeout` and slowloris; the config
//! errors of the mode; datagrams and the built-ins; and the tutorial's
//! gevent echo server (examples/gevent_echo.rs).
//!
//! The tests that hold thousands of connections raise this process's soft
//! `RLIMIT_NOFILE` to the hard limit first (and skip, saying so, when the
//! hard limit is too low), and run one at a time ([`heavy`]): the machine
//! has two shared cores, and the descriptors of this process are shared by
//! every test thread.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;

/// The control socket, for `status` (every test reads it).
const CONTROL: &str = "[control]\nsocket = \"{dir}/ctl.sock\"\n\n";
/// The metrics endpoint, on a free port.
const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n\n";

/// An async-mode service; `extra` goes into its table.
fn async_service(name: &str, listen: &[&str], plugin: &str, extra: &str) -> String {
    service(name, listen, plugin, &format!("mode = \"async\"\n{extra}"))
}

/// One test holding thousands of connections at a time.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; false (with a line
/// saying why the test is skipped) when the hard limit leaves fewer than
/// `need` descriptors.
fn nofile(need: u64) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit(RLIMIT_NOFILE)");
    }
    // Room for the test's other files, and the other tests' (not heavy).
    if hard < need + 256 {
        println!(
            "skipping: this test needs about {} open files, the hard RLIMIT_NOFILE is {hard} (raise it with ulimit -Hn)",
            need + 256
        );
        return false;
    }
    true
}

/// Opens `n` TCP connections to `to`, one after another (each connect
/// bounded by [`connect`]'s timeout).
fn open(to: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| connect(to).unwrap_or_else(|e| panic!("connection {i} of {n} to {to}: {e}")))
        .collect()
}

/// A TCP connection to `to` from the local address `from` (loopback has
/// all of 127/8).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let from = SocketAddr::new(from.parse().unwrap(), 0);
    let s = socket2::Socket::new(
        socket2::Domain::for_address(from),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.bind(&from.into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// What became of one message sent on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// It came back whole.
    Echoed,
    /// The server closed the connection (FIN) before answering.
    Eof,
    /// The connection was reset before an answer.
    Reset,
    /// Nothing came back in the time given.
    Silent,
    /// Something else came back, or another error.
    Wrong(String),
}

impl Fate {
    /// Closed without an answer: how a refused connection ends.
    fn refused(&self) -> bool {
        matches!(self, Fate::Eof | Fate::Reset)
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

/// Sends a message of its own on each connection, then waits (at most
/// `within` in all, with one poll over every connection still waiting)
/// for each to come back. The fate of each, in order.
fn exchange_all(conns: &mut [TcpStream], within: Duration) -> Vec<Fate> {
    let sent: Vec<Vec<u8>> = (0..conns.len())
        .map(|i| format!("message {i}\n").into_bytes())
        .collect();
    let mut fates: Vec<Option<Fate>> = vec![None; conns.len()];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); conns.len()];
    for (i, c) in conns.iter_mut().enumerate() {
        match c.write_all(&sent[i]) {
            Ok(()) => {}
            Err(e) if is_reset(&e) => fates[i] = Some(Fate::Reset),
            Err(e) => fates[i] = Some(Fate::Wrong(format!("write: {e}"))),
        }
    }
    let end = Instant::now() + within;
    loop {
        let waiting: Vec<usize> = (0..conns.len()).filter(|&i| fates[i].is_none()).collect();
        let left = end.saturating_duration_since(Instant::now());
        if waiting.is_empty() || left.is_zero() {
            break;
        }
        let mut fds: Vec<nix::poll::PollFd> = waiting
            .iter()
            .map(|&i| nix::poll::PollFd::new(conns[i].as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        let timeout = nix::poll::PollTimeout::try_from(left.max(Duration::from_millis(1)))
            .unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => break,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => panic!("poll(): {e}"),
        }
        let ready: Vec<usize> = waiting
            .iter()
            .zip(&fds)
            .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(&i, _)| i)
            .collect();
        drop(fds);
        for i in ready {
            let mut buf = [0u8; 256];
            match conns[i].read(&mut buf) {
                Ok(0) => fates[i] = Some(Fate::Eof),
                Ok(n) => {
                    got[i].extend_from_slice(&buf[..n]);
                    if got[i].len() >= sent[i].len() {
                        fates[i] = Some(if got[i] == sent[i] {
                            Fate::Echoed
                        } else {
                            Fate::Wrong(format!("got {:?}", String::from_utf8_lossy(&got[i])))
                        });
                    }
                }
                Err(e) if is_reset(&e) => fates[i] = Some(Fate::Reset),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => fates[i] = Some(Fate::Wrong(format!("read: {e}"))),
            }
        }
    }
    fates
        .into_iter()
        .map(|f| f.unwrap_or(Fate::Silent))
        .collect()
}

/// How many of `fates` are `want`.
fn count(fates: &[Fate], want: impl Fn(&Fate) -> bool) -> usize {
    fates.iter().filter(|f| want(f)).count()
}

/// The first few fates that are not `want`, for failure messages.
fn others(fates: &[Fate], want: impl Fn(&Fate) -> bool) -> Vec<(usize, Fate)> {
    fates
        .iter()
        .enumerate()
        .filter(|(_, f)| !want(f))
        .take(5)
        .map(|(i, f)| (i, f.clone()))
        .collect()
}

/// One worker's counters in a status document.
#[derive(Debug, Clone, Copy)]
struct Counts {
    pid: i64,
    active: u64,
    refused: u64,
    full: u64,
}

/// The counters of each worker of `service` (all generations).
fn counts(v: &serde_json::Value, service: &str) -> Vec<Counts> {
    status_workers(v, service)
        .iter()
        .map(|w| Counts {
            pid: w["pid"].as_i64().expect("pid in status"),
            active: w["active"].as_u64().expect("active in status"),
            refused: w["refused"].as_u64().expect("refused in status"),
            full: w["full"].as_u64().expect("full in status"),
        })
        .collect()
}

/// Polls `status --json` every 50 ms (lighter than [`wait_status`] on a
/// loaded machine) until `f` accepts the workers' counters; returns them.
fn wait_counts(
    d: &Daemon,
    service: &str,
    what: &str,
    f: impl Fn(&[Counts]) -> bool,
) -> Vec<Counts> {
    let end = Instant::now() + DEADLINE;
    loop {
        let c = counts(&status(d), service);
        if f(&c) {
            return c;
        }
        if Instant::now() >= end {
            panic!(
                "status never showed {what}; last: {c:?}\nlog (tail):\n{}",
                tail(&d.log_text(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of a log (the log of a test with thousands of
/// connections can be long).
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn total(c: &[Counts], f: impl Fn(&Counts) -> u64) -> u64 {
    c.iter().map(f).sum()
}

/// GET the metrics and parse them (the `prometheus-parse` crate): each
/// sample's value by name and `pid` label.
fn scrape(url: &str) -> Vec<(String, Option<String>, f64)> {
    let rest = url.strip_prefix("http://").unwrap();
    let (hostport, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = connect(hostport.parse().unwrap()).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let reply = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.split_whitespace().nth(1) == Some("200"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("the metrics do not parse: {e}\n{body}"));
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                other => panic!("{}: unexpected value {other:?}", s.metric),
            };
            (s.metric, s.labels.get("pid").map(str::to_string), value)
        })
        .collect()
}

/// A metric's value for each pid.
fn by_pid(samples: &[(String, Option<String>, f64)], name: &str) -> Vec<(i64, f64)> {
    let mut out: Vec<(i64, f64)> = samples
        .iter()
        .filter(|(m, _, _)| m == name)
        .map(|(_, pid, v)| (pid.as_deref().unwrap().parse().unwrap(), *v))
        .collect();
    out.sort_by_key(|(pid, _)| *pid);
    out
}

// ---------------------------------------------------------------------------
// Capacity and spreading.

#[test]
fn two_thousand_connections_on_one_worker_are_all_served() {
    let _heavy = heavy();
    if !nofile(2000) {
        return;
    }
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        async_service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 1\nworker_connections = 2100\nbacklog = 2048"
        )
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let started = Instant::now();
    let mut conns = open(addr, 2000);
    // All connected first: the one worker holds every one of them at once.
    let c = wait_counts(&d, "echo", "2000 connections on the worker", |c| {
        c.len() == 1 && c[0].active == 2000
    });
    assert_eq!(c[0].full, 0, "2000 of 2100 is not full: {c:?}");
    let fates = exchange_all(&mut conns, Duration::from_secs(15));
    let echoed = count(&fates, |f| *f == Fate::Echoed);
    println!(
        "2000 connections on one async worker: {echoed} echoed, {:?} in all",
        started.elapsed()
    );
    assert_eq!(
        echoed,
        2000,
        "not all served; first others: {:?}\nlog (tail):\n{}",
        others(&fates, |f| *f == Fate::Echoed),
        tail(&d.log_text(), 40)
    );
    // Still the one worker, never replaced.
    assert_eq!(d.workers().len(), 1);
    assert_eq!(d.count_log("spawned"), 1, "{}", tail(&d.log_text(), 40));
}

/// Holds 1000 connections on `workers` workers and checks the spread:
/// max/min of the per-worker counts at most 1.5, the same in status and
/// in /metrics.
fn spread(workers: usize) {
    let _heavy = heavy();
    if !nofile(1000) {
        return;
    }
    let d = Daemon::start(&format!(
        "{CONTROL}{METRICS}{}",
        async_service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            &format!("workers = {workers}\nworker_connections = 4096\nbacklog = 2048")
        )
    ));
    d.wait_ready();
    // (The master's children include the metrics process.)
    d.wait_workers(workers + 1);
    let addr = d.addr("tcp", "echo");
    let url = metrics_url(&d);
    let conns = open(addr, 1000);
    let c = wait_counts(&d, "echo", "1000 connections held", |c| {
        c.len() == workers && total(c, |w| w.active) == 1000
    });
    let mut active: Vec<u64> = c.iter().map(|w| w.active).collect();
    active.sort_unstable();
    let (min, max) = (active[0], active[workers - 1]);
    let ratio = max as f64 / min.max(1) as f64;
    println!("1000 connections on {workers} async workers: {active:?}, max/min {ratio:.2}");
    assert!(
        min > 0 && ratio <= 1.5,
        "{workers} workers: per-worker connections {active:?}, max/min {ratio:.2} > 1.5"
    );
    // /metrics says the same, by pid.
    let samples = scrape(&url);
    let mut want: Vec<(i64, f64)> = c.iter().map(|w| (w.pid, w.active as f64)).collect();
    want.sort_by_key(|(pid, _)| *pid);
    assert_eq!(
        by_pid(&samples, "preforkd_worker_connections"),
        want,
        "/metrics preforkd_worker_connections against status"
    );
    drop(conns);
}

#[test]
fn a_thousand_connections_spread_over_2_workers() {
    spread(2);
}

#[test]
fn a_thousand_connections_spread_over_8_workers() {
    spread(8);
}

#[test]
fn a_full_worker_leaves_connections_in_the_queue() {
    let d = Daemon::start(&format!(
        "{CONTROL}{METRICS}{}",
        async_service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\nworker_connections = 10"
        )
    ));
    d.wait_ready();
    d.wait_workers(3); // and the metrics process
    let addr = d.addr("tcp", "echo");
    let url = metrics_url(&d);
    let mut conns = open(addr, 30);
    // 20 served at once, 10 each; the rest stay in the accept queue.
    wait_counts(&d, "echo", "both workers at 10 connections", |c| {
        c.len() == 2 && c.iter().all(|w| w.active == 10)
    });
    let fates = exchange_all(&mut conns, Duration::from_secs(2));
    let (served, waiting): (Vec<usize>, Vec<usize>) =
        (0..30).partition(|&i| fates[i] == Fate::Echoed);
    assert_eq!(
        (served.len(), waiting.len()),
        (20, 10),
        "fates: {fates:?}\nlog:\n{}",
        d.log_text()
    );
    assert!(
        waiting.iter().all(|&i| fates[i] == Fate::Silent),
        "the ones beyond worker_connections must wait, not be refused: {fates:?}"
    );
    // Still full: nothing more was accepted meanwhile. Both workers were
    // full, and say so in status and in /metrics.
    let c = counts(&status(&d), "echo");
    assert!(c.iter().all(|w| w.active == 10), "{c:?}");
    assert!(c.iter().all(|w| w.full > 0), "full in status: {c:?}");
    let full = by_pid(&scrape(&url), "preforkd_worker_full_total");
    assert_eq!(full.len(), 2, "{full:?}");
    assert!(
        full.iter().all(|(_, v)| *v > 0.0),
        "preforkd_worker_full_total: {full:?}"
    );
    // Ten served clients leave: the ten waiting are served, their messages
    // (sent while they waited) echoed.
    let mut waiting_conns: Vec<TcpStream> = Vec::new();
    let mut rest: Vec<TcpStream> = Vec::new();
    for (i, s) in conns.into_iter().enumerate() {
        if fates[i] == Fate::Silent {
            waiting_conns.push(s);
        } else if rest.len() < 10 {
            rest.push(s);
        } // else dropped: closed
    }
    let end = Instant::now() + DEADLINE;
    let mut late = Vec::new();
    for (k, s) in waiting_conns.iter_mut().enumerate() {
        let i = waiting[k];
        let want = format!("message {i}\n");
        let mut got = vec![0u8; want.len()];
        s.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        ))
        .unwrap();
        match s.read_exact(&mut got) {
            Ok(()) if got == want.as_bytes() => {}
            other => late.push((i, format!("{other:?} {:?}", String::from_utf8_lossy(&got)))),
        }
    }
    assert!(
        late.is_empty(),
        "waiting connections not served after others closed: {late:?}\nlog:\n{}",
        d.log_text()
    );
    // And the served ones left are still served.
    let fates = exchange_all(&mut rest, Duration::from_secs(10));
    assert!(fates.iter().all(|f| *f == Fate::Echoed), "{fates:?}");
    assert_eq!(d.count_log("refused"), 0, "{}", d.log_text());
}

#[test]
fn the_master_raises_the_soft_file_limit_for_its_workers() {
    let _heavy = heavy();
    if !nofile(1000) {
        return;
    }
    // Started with a soft limit of 256: a worker that kept it would fail
    // its accepts (EMFILE) long before 600 connections.
    let dir = tempdir();
    let config = dir.path().join("preforkd.toml");
    std::fs::write(
        &config,
        format!(
            "{CONTROL}{}",
            async_service(
                "echo",
                &["tcp://127.0.0.1:0"],
                "echo",
                "workers = 1\nworker_connections = 1000"
            )
        )
        .replace("{dir}", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" -c \"$1\"")
        .arg(bin())
        .arg(&config);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    let line = d.wait_log("raised the open files limit from 256 to ");
    assert!(line.contains("(the hard limit"), "{line}");
    let mut conns = open(d.addr("tcp", "echo"), 600);
    let fates = exchange_all(&mut conns, Duration::from_secs(15));
    assert_eq!(
        count(&fates, |f| *f == Fate::Echoed),
        600,
        "first others: {:?}\nlog (tail):\n{}",
        others(&fates, |f| *f == Fate::Echoed),
        tail(&d.log_text(), 20)
    );
}

// ---------------------------------------------------------------------------
// Access control.

#[test]
fn allow_and_deny_in_async_mode() {
    let d = Daemon::start(&format!(
        "{CONTROL}{}{}",
        async_service(
            "denied",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\ndeny = [\"127.0.0.1\"]"
        ),
        async_service(
            "allowed",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\nallow = [\"127.0.0.1\"]"
        ),
    ));
    d.wait_ready();
    let (denied, allowed) = (d.addr("tcp", "denied"), d.addr("tcp", "allowed"));
    let mut probes = vec![
        connect_from("127.0.0.1", denied),
        connect_from("127.0.0.2", denied),
        connect_from("127.0.0.1", allowed),
        connect_from("127.0.0.2", allowed),
        connect_from("127.0.0.3", allowed),
    ];
    let t = Instant::now();
    let fates = exchange_all(&mut probes, Duration::from_secs(10));
    assert!(fates[0].refused(), "127.0.0.1 -> denied: {:?}", fates[0]);
    assert_eq!(fates[1], Fate::Echoed, "127.0.0.2 -> denied");
    assert_eq!(fates[2], Fate::Echoed, "127.0.0.1 -> allowed");
    assert!(fates[3].refused(), "127.0.0.2 -> allowed: {:?}", fates[3]);
    assert!(fates[4].refused(), "127.0.0.3 -> allowed: {:?}", fates[4]);
    assert!(t.elapsed() < Duration::from_secs(5), "refusals not at once");
    d.wait_log(": denied by 127.0.0.1");
    let v = status(&d);
    let refused = |s: &str| total(&counts(&v, s), |w| w.refused);
    assert_eq!((refused("denied"), refused("allowed")), (1, 2));
}

#[test]
fn max_connections_per_ip_counts_across_workers() {
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        async_service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            // worker_connections = 3: should the first three land on one
            // worker (the accept queue's wake-ups favour an idle waiter),
            // it is full, and the next ones go to the other.
            "workers = 2\nworker_connections = 3\nmax_connections_per_ip = 3"
        )
    ));
    d.wait_ready();
    d.wait_workers(2);
    let addr = d.addr("tcp", "echo");
    let mut held = open(addr, 3);
    let fates = exchange_all(&mut held, Duration::from_secs(10));
    assert!(fates.iter().all(|f| *f == Fate::Echoed), "{fates:?}");
    let before = counts(&status(&d), "echo");
    // The 4th to the 12th: refused, on whichever worker they land.
    let mut extra = open(addr, 9);
    let fates = exchange_all(&mut extra, Duration::from_secs(10));
    let after = wait_counts(&d, "echo", "9 refusals counted", |c| {
        total(c, |w| w.refused) >= count(&fates, Fate::refused) as u64
    });
    println!("3 held per worker {before:?}; after 9 more: {after:?}");
    assert!(
        fates.iter().all(Fate::refused),
        "connections beyond max_connections_per_ip = 3 (held per worker: {:?}) were served: {fates:?}",
        before.iter().map(|w| w.active).collect::<Vec<_>>()
    );
    // Refused on a worker that holds fewer than 3 itself: the count is
    // the service's, not the worker's.
    assert!(
        after.iter().any(|w| w.active < 3 && w.refused > 0),
        "no refusal on a worker holding fewer than 3 (no connection landed there?): {after:?}"
    );
    assert_eq!(total(&after, |w| w.active), 3, "{after:?}");
    // Two leave: two more are admitted, then no more.
    drop(held.drain(..2));
    wait_counts(&d, "echo", "one connection left", |c| {
        total(c, |w| w.active) == 1
    });
    let mut again = open(addr, 2);
    let fates = exchange_all(&mut again, Duration::from_secs(10));
    assert!(fates.iter().all(|f| *f == Fate::Echoed), "{fates:?}");
    let mut one_more = open(addr, 1);
    let fates = exchange_all(&mut one_more, Duration::from_secs(10));
    assert!(fates[0].refused(), "{fates:?}");
}

#[test]
fn max_connections_per_ip_admits_1500_of_2000() {
    let _heavy = heavy();
    if !nofile(2000) {
        return;
    }
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        async_service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\nworker_connections = 4096\nbacklog = 2048\nmax_connections_per_ip = 1500"
        )
    ));
    d.wait_ready();
    d.wait_workers(2);
    let addr = d.addr("tcp", "echo");
    let mut conns = open(addr, 2000);
    // Every connection was decided: admitted (active) or refused. The
    // table's count is one atomic add per accept, so no slack: a
    // connection is refused only once 1500 others are counted.
    let c = wait_counts(&d, "echo", "2000 connections admitted or refused", |c| {
        total(c, |w| w.active) + total(c, |w| w.refused) == 2000
    });
    println!("max_connections_per_ip = 1500, 2000 connections: {c:?}");
    assert_eq!(
        (total(&c, |w| w.active), total(&c, |w| w.refused)),
        (1500, 500),
        "admitted and refused, per worker: {c:?}"
    );
    let fates = exchange_all(&mut conns, Duration::from_secs(15));
    let echoed = count(&fates, |f| *f == Fate::Echoed);
    let refused = count(&fates, Fate::refused);
    assert_eq!(
        (echoed, refused),
        (1500, 500),
        "first others: {:?}",
        others(&fates, |f| *f == Fate::Echoed || f.refused())
    );
}

// ---------------------------------------------------------------------------
// Idle connections.

#[test]
fn idle_timeout_closes_a_silent_connection_with_fin() {
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        async_service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 1\nidle_timeout = \"1s\""
        )
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let mut silent = connect(addr).unwrap();
    let mut talking = connect(addr).unwrap();
    let t = Instant::now();
    // One that speaks every 300 ms is not idle, whatever its age.
    while t.elapsed() < Duration::from_millis(2500) {
        let fates = exchange_all(std::slice::from_mut(&mut talking), Duration::from_secs(5));
        assert_eq!(fates, [Fate::Echoed], "after {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    // The silent one was closed meanwhile, with a FIN (EOF, not a reset).
    let mut buf = [0u8; 16];
    match silent.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the silent connection: {other:?} (want EOF)"),
    }
    // Measured on a fresh one: closed after ~1 s, not before.
    let mut fresh = connect(addr).unwrap();
    let t = Instant::now();
    match fresh.read(&mut buf) {
        Ok(0) => {}
        other => panic!("a fresh silent connection: {other:?} (want EOF)"),
    }
    let after = t.elapsed();
    println!("idle_timeout = 1s: closed after {after:?}");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
    // The talker, now silent, goes the same way.
    match talking.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the talker, silent: {other:?} (want EOF)"),
    }
    let log = d.log_text();
    assert!(!log.contains("WARN"), "{log}");
}

#[test]
fn slowloris_5000_silent_connections_do_not_starve_a_client() {
    let _heavy = heavy();
    if !nofile(5000) {
        return;
    }
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        async_service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 1\nworker_connections = 6000\nbacklog = 4096\nidle_timeout = \"60s\""
        )
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let mut silent = open(addr, 5000);
    wait_counts(&d, "echo", "5000 silent connections held", |c| {
        c.len() == 1 && c[0].active == 5000
    });
    // A normal client, now: connected, answered promptly.
    let t = Instant::now();
    echo_once(addr, b"I am not slowloris\n").unwrap_or_else(|e| panic!("{e}"));
    let took = t.elapsed();
    println!("echo beside 5000 silent connections: {took:?}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    // The silent ones are all still held (none dropped to make room), and
    // each still served when it speaks (one in 250 asked).
    let c = wait_counts(&d, "echo", "the 5000 again", |c| c[0].active == 5000);
    assert_eq!(c[0].full, 0, "{c:?}");
    let mut sample: Vec<TcpStream> = silent.drain(..).step_by(250).collect();
    let fates = exchange_all(&mut sample, Duration::from_secs(10));
    assert!(fates.iter().all(|f| *f == Fate::Echoed), "{fates:?}");
}

// ---------------------------------------------------------------------------
// Configuration errors.

/// `preforkd check -c FILE` on `config`: exit 78 and one line
/// `preforkd: FILE:LINE:COL: message`, at the first `needle` of the
/// config; returns the message.
fn check_error(bin: &Path, config: &str, needle: &str) -> String {
    let dir = tempdir();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(bin)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", show(&out));
    let at = config.find(needle).unwrap_or_else(|| panic!("{needle:?}"));
    let line = config[..at].matches('\n').count() + 1;
    let col = at - config[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
    let want = format!("preforkd: {}:{line}:{col}: ", path.display());
    lines[0]
        .strip_prefix(&want)
        .unwrap_or_else(|| panic!("expected {want:?} at the start of {:?}", lines[0]))
        .to_string()
}

fn one(extra: &str, plugin: &str) -> String {
    service("a", &["tcp://127.0.0.1:0"], plugin, extra)
}

#[test]
fn config_errors_of_the_async_mode() {
    let b = bin();
    let m = check_error(&b, &one("mode = \"async\"\nthreads = 4", "echo"), "4\n");
    assert!(
        m.contains("threads applies to mode = \"threads\""),
        "threads in async mode: {m}"
    );
    let m = check_error(&b, &one("worker_connections = 10", "echo"), "10\n");
    assert!(
        m.contains("worker_connections applies to mode = \"async\""),
        "worker_connections in threads mode: {m}"
    );
    let m = check_error(
        &b,
        &one("mode = \"async\"\nworker_connections = 0", "echo"),
        "0\n",
    );
    assert!(
        m.contains("worker_connections must be between 1 and"),
        "worker_connections = 0: {m}"
    );
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit(RLIMIT_NOFILE)");
    if hard < 1 << 20 {
        let n = hard + 1;
        let m = check_error(
            &b,
            &one(
                &format!("mode = \"async\"\nworker_connections = {n}"),
                "echo",
            ),
            &format!("{n}\n"),
        );
        assert!(
            m.contains(&format!("worker_connections = {n}"))
                && m.contains(&format!("open files limit of {hard}")),
            "worker_connections beyond the hard limit {hard}: {m}"
        );
    } else {
        println!("skipping the file limit case: the hard RLIMIT_NOFILE ({hard}) is huge");
    }
    let m = check_error(
        &b,
        &format!(
            "{}[service.handler.options]\npath = \"/usr/lib/preforkd/libx.so\"\n",
            one("mode = \"async\"", "dylib")
        ),
        "\"async\"",
    );
    assert!(
        m.contains("plugin \"dylib\" serves mode = \"threads\""),
        "dylib in async mode: {m}"
    );
}

#[test]
fn plugins_lists_the_modes() {
    let out = std::process::Command::new(bin())
        .arg("plugins")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    let modes = |name: &str| {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
        line.split("mode ")
            .nth(1)
            .map(|rest| rest.split("  ").next().unwrap().trim().to_string())
            .unwrap_or_else(|| panic!("no modes in {line:?}"))
    };
    for builtin in ["echo", "discard", "daytime", "chargen"] {
        assert_eq!(modes(builtin), "threads, async", "{builtin}:\n{text}");
    }
    assert_eq!(modes("dylib"), "threads", "{text}");
}

// ---------------------------------------------------------------------------
// Datagrams and the built-ins.

/// Checks that `data`, starting `at` bytes into a chargen stream, is the
/// RFC 864 pattern (72 rotating characters and CR LF per line).
fn check_chargen(data: &[u8], at: usize) {
    for (k, b) in data.iter().enumerate() {
        let pos = at + k;
        let (line, col) = (pos / 74, pos % 74);
        let want = match col {
            72 => b'\r',
            73 => b'\n',
            _ => b' ' + ((line + col) % 95) as u8,
        };
        assert_eq!(*b, want, "byte {pos} of the chargen stream");
    }
}

#[test]
fn datagrams_and_builtins_in_async_mode() {
    let config = format!(
        "{CONTROL}{}{}{}{}",
        async_service(
            "echo",
            &[
                "udp://127.0.0.1:0",
                "unixgram:{dir}/echo.dgram",
                "unix:{dir}/echo.sock"
            ],
            "echo",
            "workers = 2"
        ),
        async_service(
            "daytime",
            &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
            "daytime",
            "workers = 1"
        ),
        async_service(
            "discard",
            &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
            "discard",
            "workers = 1"
        ),
        async_service("chargen", &["udp://127.0.0.1:0"], "chargen", "workers = 1"),
    );
    let d = Daemon::start(&config);
    d.wait_ready();
    // echo over udp, unixgram and a unix stream.
    assert_eq!(
        udp_ask(d.addr("udp", "echo"), "127.0.0.1:0", b"hello over udp"),
        b"hello over udp"
    );
    let g = UnixDatagram::bind(d.path("client.dgram")).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    g.send_to(b"hello over unixgram", d.path("echo.dgram"))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = g.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello over unixgram");
    let mut u = connect_unix(&d.path("echo.sock")).unwrap();
    u.write_all(b"hello over unix").unwrap();
    let mut got = [0u8; 15];
    u.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello over unix");
    drop(u);
    // daytime: one line then FIN over tcp; one datagram over udp.
    let mut s = connect(d.addr("tcp", "daytime")).unwrap();
    let line = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    assert!(line.ends_with(" GMT\r\n"), "{line:?}");
    assert_eq!(line.lines().count(), 1, "{line:?}");
    let reply = String::from_utf8(udp_ask(d.addr("udp", "daytime"), "127.0.0.1:0", b"?")).unwrap();
    assert!(reply.ends_with(" GMT\r\n"), "{reply:?}");
    // discard: nothing back, a clean EOF after ours; no datagram answer.
    let mut s = connect(d.addr("tcp", "discard")).unwrap();
    s.write_all(&[7u8; 100_000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"");
    let q = UdpSocket::bind("127.0.0.1:0").unwrap();
    q.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    q.send_to(b"into the void", d.addr("udp", "discard"))
        .unwrap();
    assert!(q.recv(&mut [0u8; 16]).is_err(), "discard must not answer");
    // chargen over udp: 0 to 512 bytes of the pattern.
    let reply = udp_ask(d.addr("udp", "chargen"), "127.0.0.1:0", b"?");
    assert!(reply.len() <= 512, "{} bytes", reply.len());
    check_chargen(&reply, 0);
    let log = d.log_text();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}

#[test]
fn chargen_stops_on_sigterm_with_fin() {
    let mut d = Daemon::start(&async_service(
        "chargen",
        &["tcp://127.0.0.1:0"],
        "chargen",
        "workers = 1\ngraceful_timeout = \"20s\"",
    ));
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "chargen")).unwrap();
    let mut first = vec![0u8; 74 * 200];
    s.read_exact(&mut first).unwrap();
    check_chargen(&first, 0);
    d.signal(libc::SIGTERM);
    // The rest of the stream, still the pattern, ends with a FIN (EOF),
    // not a reset, long before graceful_timeout.
    let t = Instant::now();
    let mut at = first.len();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                check_chargen(&buf[..n], at);
                at += n;
            }
            Err(e) => panic!("after {at} bytes: {e} (want EOF); log:\n{}", d.log_text()),
        }
        assert!(
            t.elapsed() < DEADLINE,
            "chargen still sending after SIGTERM"
        );
    }
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", d.log_text());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        t.elapsed()
    );
}

// ---------------------------------------------------------------------------
// The tutorial's gevent echo server (examples/gevent_echo.rs).

/// target/debug/examples/gevent_echo, next to this test's deps/ directory.
fn gevent_echo_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/gevent_echo");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test` (which builds the examples) or `cargo build --example gevent_echo`",
        bin.display()
    );
    bin
}

#[test]
fn the_gevent_echo_example_echoes_and_answers_eof_with_fin() {
    let b = gevent_echo_bin();
    let config = format!(
        "{CONTROL}{}",
        async_service(
            "gevent",
            &["tcp://127.0.0.1:0", "unix:{dir}/gevent.sock"],
            "gevent-echo",
            "workers = 2\nworker_connections = 100"
        )
    );
    let d = Daemon::start_bin(&b, &config, &[]);
    d.wait_ready();
    let addr = d.addr("tcp", "gevent");
    // Each read echoed, on many connections at once.
    let mut conns = open(addr, 50);
    let fates = exchange_all(&mut conns, Duration::from_secs(10));
    assert!(fates.iter().all(|f| *f == Fate::Echoed), "{fates:?}");
    drop(conns);
    // Half-close: 256 KiB then our FIN, nothing read until then; all of it
    // comes back, then the server's FIN (EOF, not a reset).
    let sent: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut s = connect(addr).unwrap();
    let reader = {
        let mut r = s.try_clone().unwrap();
        std::thread::spawn(move || read_to_eof(&mut r))
    };
    s.write_all(&sent).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let back = reader
        .join()
        .unwrap()
        .expect("EOF after the echo, not a reset");
    assert_eq!(back.len(), sent.len());
    assert!(back == sent, "the echo differs");
    // The same over the Unix socket.
    let mut u = connect_unix(&d.path("gevent.sock")).unwrap();
    u.write_all(b"over unix").unwrap();
    u.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut u).unwrap(), b"over unix");
    // The plugin serves async mode only, and says so.
    let out = std::process::Command::new(&b)
        .arg("plugins")
        .output()
        .unwrap();
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("gevent-echo "))
        .unwrap_or_else(|| panic!("{}", show(&out)));
    assert!(line.contains("mode async "), "{line:?}");
    let m = check_error(
        &b,
        &service("g", &["tcp://127.0.0.1:0"], "gevent-echo", ""),
        "\"gevent-echo\"",
    );
    assert!(
        m.contains("plugin \"gevent-echo\" serves mode = \"async\" only"),
        "{m}"
    );
    let log = d.log_text();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}

/// The connections `status` lists for the one worker of `service`: their
/// ages (ms), in the order listed.
fn listed_ages(d: &Daemon, service: &str) -> Vec<u64> {
    let v = status(d);
    status_workers(&v, service)[0]["connections"]
        .as_array()
        .expect("connections in status")
        .iter()
        .map(|c| c["age_ms"].as_u64().expect("age_ms"))
        .collect()
}

#[test]
fn status_lists_only_the_oldest_connections() {
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        async_service("echo", &["unix:{dir}/echo.sock"], "echo", "workers = 1")
    ));
    d.wait_ready();
    let conns = |n: usize| -> Vec<UnixStream> {
        (0..n)
            .map(|_| connect_unix(&d.path("echo.sock")).unwrap())
            .collect()
    };
    // 16 old ones, then (300 ms older: not a wait for anything, the age
    // difference the test looks for) 32 young ones.
    let old = conns(16);
    wait_counts(&d, "echo", "16 connections", |c| c[0].active == 16);
    std::thread::sleep(Duration::from_millis(300));
    let young = conns(32);
    let c = wait_counts(&d, "echo", "48 connections", |c| c[0].active == 48);
    let ages = listed_ages(&d, "echo");
    assert!(
        (1..=16).contains(&ages.len()),
        "{} connections listed for {c:?}: the oldest few, not all",
        ages.len()
    );
    assert!(
        ages.windows(2).all(|w| w[0] >= w[1]),
        "oldest first: {ages:?}"
    );
    assert!(
        ages.iter().all(|&a| a >= 250),
        "the oldest are listed, not the young ones: {ages:?}"
    );
    // The old ones leave: the young ones take their places in the list.
    drop(old);
    wait_counts(&d, "echo", "the 32 young ones", |c| c[0].active == 32);
    let ages = listed_ages(&d, "echo");
    assert!(
        (1..=16).contains(&ages.len()),
        "after the oldest left: {ages:?}"
    );
    drop(young);
}
