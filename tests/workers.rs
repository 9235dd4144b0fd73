//! Workers: a SIGKILLed worker is reaped and replaced while clients keep
//! being served, workers follow a SIGKILLed master out, `max_requests`
//! recycles a worker, SIGTTIN/SIGTTOU resize every pool, and SIGUSR1
//! reopens logs without harming a worker.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// Sends `sig` to `pid` (a negative pid: a process group); panics if
/// kill(2) fails.
fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory effects.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// True once `pid` is no longer a child of `master`, dead or alive: a zombie
/// is still listed among its parent's children until the parent reaps it.
fn reaped(master: i32, pid: i32) -> bool {
    state(pid).is_none() || !children(master).contains(&pid)
}

/// How one echo exchange of the client loop failed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Refused,
    Reset,
    EarlyEof,
    Timeout,
    Mismatch,
    Other(String),
}

fn classify(e: &std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Failure::Reset
        }
        ErrorKind::UnexpectedEof => Failure::EarlyEof,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Other(e.to_string()),
    }
}

/// Connect, send `payload`, read it back, close.
fn exchange(addr: SocketAddr, payload: &[u8]) -> Result<(), Failure> {
    let mut s = connect(addr).map_err(|e| classify(&e))?;
    s.write_all(payload).map_err(|e| classify(&e))?;
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).map_err(|e| classify(&e))?;
    if got != payload {
        return Err(Failure::Mismatch);
    }
    Ok(())
}

/// Clients that echo in a loop (connect, echo, close) on their own threads
/// until stopped, counting successes and failures by kind.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Vec<Failure>>>,
}

impl ClientLoop {
    fn start(addr: SocketAddr, clients: usize) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let threads = (0..clients)
            .map(|c| {
                let (stop, ok) = (stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let payload = format!("client {c} request {i}\n");
                        match exchange(addr, payload.as_bytes()) {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(f) => failures.push(f),
                        }
                        i += 1;
                    }
                    failures
                })
            })
            .collect();
        ClientLoop { stop, ok, threads }
    }

    fn successes(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests than now have succeeded.
    fn wait_more(&self, n: usize, log: impl Fn() -> String) {
        let target = self.successes() + n;
        wait_for(DEADLINE, || (self.successes() >= target).then_some(())).unwrap_or_else(|| {
            panic!(
                "clients stuck at {} successes, expected {target}; log:\n{}",
                self.successes(),
                log()
            )
        });
    }

    /// Stops the clients; returns every failure they saw.
    fn finish(self) -> Vec<Failure> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("client thread panicked"))
            .collect()
    }
}

/// Waits until `killed` are all reaped and the master has `n` workers again,
/// none of them in `killed`, each one logged as ready. Returns them.
fn wait_replaced(d: &Daemon, killed: &[i32], n: usize) -> Vec<i32> {
    let master = d.pid();
    let fresh = wait_for(DEADLINE, || {
        let w = d.workers();
        let log = d.log_text();
        let done = killed.iter().all(|p| reaped(master, *p))
            && w.len() == n
            && w.iter().all(|p| !killed.contains(p) && alive(*p))
            && w.iter().all(|p| log.contains(&format!("(pid {p}) ready")));
        done.then_some(w)
    });
    fresh.unwrap_or_else(|| {
        panic!(
            "killed {killed:?}, workers now {:?}; log:\n{}",
            d.workers(),
            d.log_text()
        )
    })
}

#[test]
fn sigkilled_workers_are_reaped_and_replaced_while_clients_are_served() {
    let (d, addr, first) = start_echo("workers = 3", 3);

    let clients = ClientLoop::start(addr, 2);
    clients.wait_more(20, || d.log_text());

    // One worker.
    let victim = first[0];
    kill(victim, libc::SIGKILL);
    let second = wait_replaced(&d, &[victim], 3);
    d.wait_log(&format!("(pid {victim}) killed by signal SIGKILL"));
    clients.wait_more(20, || d.log_text());

    // All of them at once.
    for p in &second {
        kill(*p, libc::SIGKILL);
    }
    let third = wait_replaced(&d, &second, 3);
    for p in &second {
        d.wait_log(&format!("(pid {p}) killed by signal SIGKILL"));
    }
    clients.wait_more(50, || d.log_text());
    let succeeded = clients.successes();
    let failures = clients.finish();

    // Each client has one request in flight at a time, and only a request
    // in flight on a killed worker may fail: at most one per kill. The
    // listener lives in the master, so nothing is ever refused.
    let killed = 1 + second.len();
    eprintln!("{succeeded}+ requests succeeded; failures: {failures:?}");
    let mut by_kind: BTreeMap<Failure, usize> = BTreeMap::new();
    for f in &failures {
        *by_kind.entry(f.clone()).or_default() += 1;
    }
    assert!(
        failures.len() <= killed,
        "{} failed requests for {killed} killed workers: {by_kind:?}",
        failures.len()
    );
    assert!(!by_kind.contains_key(&Failure::Refused), "{by_kind:?}");
    assert!(!by_kind.contains_key(&Failure::Mismatch), "{by_kind:?}");

    // Every replacement is a live, titled worker of the same slots.
    let mut titles: Vec<String> = third.iter().map(|p| title(*p)).collect();
    titles.sort();
    assert_eq!(
        titles,
        [
            "preforkd: worker echo#0 gen 1",
            "preforkd: worker echo#1 gen 1",
            "preforkd: worker echo#2 gen 1"
        ]
    );
    assert!(d.workers().iter().all(|p| state(*p) != Some('Z')));
    echo_once(addr, b"after the kills").unwrap();
}

/// An echo service on a kernel-chosen TCP port, with `extra` in its table,
/// once its `n` workers are up: the daemon, its address, the worker pids.
fn start_echo(extra: &str, n: usize) -> (Daemon, SocketAddr, Vec<i32>) {
    let d = Daemon::start(&service("echo", &["tcp://127.0.0.1:0"], "echo", extra));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let workers = d.wait_workers(n);
    (d, addr, workers)
}

#[test]
fn workers_leave_when_the_master_is_sigkilled() {
    let (mut d, addr, workers) = start_echo("workers = 3", 3);

    // A worker busy with an idle connection must leave too.
    let mut idle = connect(addr).unwrap();
    idle.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    idle.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    let killed_at = Instant::now();
    kill(d.pid(), libc::SIGKILL);
    let status = d.wait_exit(DEADLINE);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );

    // PR_SET_PDEATHSIG sends SIGTERM: the idle connection is closed cleanly.
    let rest = read_to_eof(&mut idle).expect("idle connection: EOF, not an error");
    assert_eq!(rest, b"");
    drop(idle);

    let gone = wait_for(
        Duration::from_secs(5).saturating_sub(killed_at.elapsed()),
        || workers.iter().all(|p| !alive(*p)).then_some(()),
    );
    let left: Vec<i32> = workers.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        gone.is_some(),
        "workers {left:?} still alive {:?} after the master died; log:\n{}",
        killed_at.elapsed(),
        d.log_text()
    );
    // Nobody holds the listening socket any more.
    let refused = wait_for(DEADLINE, || match connect(addr) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(()),
        _ => None,
    });
    assert!(refused.is_some(), "{addr} still accepts connections");
}

#[test]
fn max_requests_recycles_the_worker() {
    let (d, addr, workers) = start_echo("workers = 1\nmax_requests = 3", 1);
    let first = workers[0];

    for i in 0..10 {
        let msg = format!("request {i}\n");
        echo_once(addr, msg.as_bytes())
            .unwrap_or_else(|e| panic!("request {i}: {e}; log:\n{}", d.log_text()));
    }
    // 10 connections at 3 per worker: three workers recycled, a fourth serving.
    let recycled = wait_for(DEADLINE, || {
        (d.count_log(") exited with status 0 (recycled)") >= 3).then_some(())
    });
    assert!(recycled.is_some(), "log:\n{}", d.log_text());
    d.wait_log(&format!(
        "worker echo#0 (pid {first}) exited with status 0 (recycled)"
    ));
    assert_eq!(
        d.count_log("worker echo#0: served 3 requests (max_requests); recycling"),
        3
    );

    let now = d.wait_workers(1)[0];
    assert_ne!(now, first, "the worker was not replaced");
    assert_eq!(title(now), "preforkd: worker echo#0 gen 1");
    // The first worker and three replacements.
    let spawned = wait_for(DEADLINE, || {
        let n = d
            .log_text()
            .lines()
            .filter(|l| l.contains("worker echo#0 (pid ") && l.ends_with(") spawned"))
            .count();
        (n == 4).then_some(())
    });
    assert!(spawned.is_some(), "log:\n{}", d.log_text());
    echo_once(addr, b"still served").unwrap();
    // A recycled worker did its job: its slot is refilled at once, not
    // backed off like a crash loop (which would soon delay clients by 30 s).
    let log = d.log_text();
    assert!(!log.contains("failed to start"), "log:\n{log}");
}

#[test]
fn sigterm_to_a_worker_makes_it_leave_gracefully_and_be_replaced() {
    let (d, addr, workers) = start_echo("workers = 1", 1);
    let worker = workers[0];
    let mut idle = connect(addr).unwrap();
    idle.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    idle.read_exact(&mut buf).unwrap();

    kill(worker, libc::SIGTERM);
    // Nothing is owed on the idle connection: it ends with a FIN.
    let rest =
        read_to_eof(&mut idle).unwrap_or_else(|e| panic!("idle: {e}; log:\n{}", d.log_text()));
    assert_eq!(rest, b"");
    drop(idle);
    let now = wait_replaced(&d, &[worker], 1);
    d.wait_log(&format!(
        "worker echo#0 (pid {worker}) exited with status 0"
    ));
    assert_eq!(title(now[0]), "preforkd: worker echo#0 gen 1");
    echo_once(addr, b"served by the replacement").unwrap();
    assert!(
        !d.log_text().contains("failed to start"),
        "log:\n{}",
        d.log_text()
    );
}

/// Worker counts per service, from the titles; None while a worker is
/// still being born (not yet titled) or a zombie is around.
fn per_service(d: &Daemon) -> Option<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for p in d.workers() {
        if state(p)? == 'Z' {
            return None;
        }
        let t = title(p);
        let name = t
            .strip_prefix("preforkd: worker ")?
            .split('#')
            .next()?
            .to_string();
        *counts.entry(name).or_default() += 1;
    }
    Some(counts)
}

/// Waits until the master has `alpha + beta` workers, that many per service.
fn wait_counts(d: &Daemon, alpha: usize, beta: usize) {
    d.wait_workers(alpha + beta);
    let want = BTreeMap::from([("alpha".to_string(), alpha), ("beta".to_string(), beta)]);
    wait_for(DEADLINE, || {
        (per_service(d).as_ref() == Some(&want)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "expected {want:?}, have {:?}; log:\n{}",
            per_service(d),
            d.log_text()
        )
    });
}

#[test]
fn sigttin_and_sigttou_resize_every_service() {
    let config = [
        service("alpha", &["tcp://127.0.0.1:0"], "echo", "workers = 2"),
        service("beta", &["unix:{dir}/beta.sock"], "echo", "workers = 1"),
    ]
    .join("\n");
    let d = Daemon::start(&config);
    d.wait_ready();
    wait_counts(&d, 2, 1);

    // One signal at a time, each seen by the master before the next:
    // signals of one kind that arrive together may merge into one.
    let step = |sig: i32, needle: &str, times: usize, alpha: usize, beta: usize| {
        kill(d.pid(), sig);
        wait_for(DEADLINE, || (d.count_log(needle) >= times).then_some(()))
            .unwrap_or_else(|| panic!("no {times} lines with {needle:?}; log:\n{}", d.log_text()));
        wait_counts(&d, alpha, beta);
    };
    step(
        libc::SIGTTIN,
        "SIGTTIN: service beta now has 2 workers",
        1,
        3,
        2,
    );
    assert_eq!(d.count_log("SIGTTIN: service alpha now has 3 workers"), 1);
    step(
        libc::SIGTTIN,
        "SIGTTIN: service beta now has 3 workers",
        1,
        4,
        3,
    );
    step(
        libc::SIGTTOU,
        "SIGTTOU: service beta now has 2 workers",
        1,
        3,
        2,
    );
    step(
        libc::SIGTTOU,
        "SIGTTOU: service beta now has 1 worker",
        1,
        2,
        1,
    );
    // Never below one worker.
    step(
        libc::SIGTTOU,
        "SIGTTOU: service beta keeps its last worker",
        1,
        1,
        1,
    );
    step(
        libc::SIGTTOU,
        "SIGTTOU: service alpha keeps its last worker",
        1,
        1,
        1,
    );
    assert_eq!(
        d.count_log("SIGTTOU: service beta keeps its last worker"),
        2
    );
    // Give a wrong extra stop the chance to show, then look again.
    std::thread::sleep(Duration::from_millis(300));
    wait_counts(&d, 1, 1);

    // Retired workers left cleanly (not recycled, not killed); the rest
    // still serve both services.
    let exits = wait_for(DEADLINE, || {
        (d.count_log(") exited with status 0") == 5).then_some(())
    });
    let log = d.log_text();
    assert!(exits.is_some(), "expected 5 clean exits; log:\n{log}");
    assert!(!log.contains("(recycled)"), "log:\n{log}");
    assert!(!log.contains("SIGKILL"), "log:\n{log}");
    echo_once(d.addr("tcp", "alpha"), b"alpha").unwrap();
    let mut u = std::os::unix::net::UnixStream::connect(d.path("beta.sock")).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    u.write_all(b"beta").unwrap();
    let mut buf = [0u8; 4];
    u.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"beta");
}

/// SIGUSR1 makes the master reopen its logs and pass the signal on; the
/// workers survive it, and survive SIGHUP and SIGUSR2 sent to them directly
/// (those are the master's: reload and upgrade).
#[test]
fn sigusr1_reopens_logs_and_workers_survive_master_signals() {
    let mut d = Daemon::start(&service(
        "echo",
        &["tcp://127.0.0.1:0"],
        "echo",
        "workers = 2",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let mut before = d.wait_workers(2);
    before.sort();

    let line = "SIGUSR1: log files reopened; told 2 workers";
    for round in 0..2 {
        kill(d.pid(), libc::SIGUSR1);
        wait_for(DEADLINE, || (d.count_log(line) > round).then_some(()))
            .unwrap_or_else(|| panic!("no log line {line:?}; log:\n{}", d.log_text()));
    }
    for w in &before {
        for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
            kill(*w, sig);
        }
    }
    echo_once(addr, b"after the signals").unwrap();
    // Let a wrongly delivered signal take effect before looking.
    std::thread::sleep(Duration::from_millis(300));

    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the master exited; log:\n{}",
        d.log_text()
    );
    let mut after = d.wait_workers(2);
    after.sort();
    assert_eq!(before, after, "workers changed; log:\n{}", d.log_text());
    let log = d.log_text();
    assert!(!log.contains("exited"), "log:\n{log}");
    assert!(!log.contains("killed"), "log:\n{log}");
    echo_once(addr, b"still serving").unwrap();
}

/// A client that sends and never reads blocks its worker in a write; when
/// the master dies, the worker must still leave (within ORPHAN_GRACE, 1 s),
/// not linger with a copy of the listener.
#[test]
fn workers_leave_when_the_master_dies_even_with_a_stuck_client() {
    let (mut d, addr, workers) = start_echo("workers = 1\ngraceful_timeout = \"60s\"", 1);

    // Fill both directions: the worker ends up blocked writing its echo.
    let stuck = connect(addr).unwrap();
    stuck.set_nonblocking(true).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    let full = wait_for(DEADLINE, || match (&stuck).write(&chunk) {
        Ok(n) => {
            sent += n;
            None
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => (sent > 0).then_some(()),
        Err(e) => panic!("write: {e}"),
    });
    assert!(full.is_some(), "the connection never filled up");

    kill(d.pid(), libc::SIGKILL);
    d.wait_exit(DEADLINE);
    let gone = wait_for(Duration::from_secs(10), || {
        workers.iter().all(|p| !alive(*p)).then_some(())
    });
    assert!(
        gone.is_some(),
        "worker still alive after the master died; log:\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("(master gone); exiting"),
        "log:\n{}",
        d.log_text()
    );
    drop(stuck);
}
