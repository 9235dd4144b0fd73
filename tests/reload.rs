//! Reload (SIGHUP, `preforkd reload`) and binary upgrade under load: nothing
//! a client sent is lost; a broken config or a generation that cannot boot
//! changes nothing; listeners come and go with the config; a storm of HUPs
//! collapses into few reloads with never more than two generations alive;
//! `workers`, `threads` and `max_requests` take effect.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// A pid file and a control socket, which `preforkd reload`, `upgrade` and
/// `status` need.
const HEAD: &str =
    "[daemon]\npid_file = \"{dir}/preforkd.pid\"\n\n[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// Sends `sig` to `pid`; panics if kill(2) fails.
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

// ---------------------------------------------------------------------------
// The load client.

/// How a request failed. A clean EOF before any byte of the answer is not a
/// failure: the worker closed at a request boundary, and the client resends
/// on a new connection (as an HTTP keep-alive client does).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Refused,
    Reset,
    /// Part of the answer, then EOF.
    PartialAnswer,
    Timeout,
    Mismatch,
    /// Bytes arrived that no request asked for.
    Unsolicited,
    /// Closed again and again: the request was never answered.
    NeverAnswered,
    Other(String),
}

fn classify(e: &std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Failure::Reset
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Other(e.to_string()),
    }
}

/// What the load clients counted.
#[derive(Default)]
struct Tally {
    /// Requests answered exactly.
    ok: AtomicUsize,
    /// A request met a clean EOF before any byte of its answer and was sent
    /// again on a new connection.
    reconnects: AtomicUsize,
    /// A kept-alive connection was found closed (EOF already there) before
    /// the next request was sent on it: a new one was opened.
    stale: AtomicUsize,
    failures: Mutex<BTreeMap<Failure, usize>>,
    /// The first few failures, described.
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, f: Failure, what: String) {
        *self.failures.lock().unwrap().entry(f).or_default() += 1;
        let mut ex = self.examples.lock().unwrap();
        if ex.len() < 20 {
            ex.push(what);
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    fn summary(&self) -> String {
        format!(
            "{} requests ok, {} resent after a clean close, {} stale keep-alive connections replaced, failures {:?}, first failures {:#?}",
            self.ok(),
            self.reconnects.load(Ordering::SeqCst),
            self.stale.load(Ordering::SeqCst),
            self.failures.lock().unwrap(),
            self.examples.lock().unwrap()
        )
    }
}

/// A request nobody else sends: the client, its sequence number, then 16 to
/// about 1000 bytes of filler that depends on both, and a newline. Small
/// enough to travel in one segment on loopback, so that a worker never sees
/// half of it.
fn payload(client: usize, i: u64) -> Vec<u8> {
    let mut p = format!("client {client} request {i}:").into_bytes();
    let len = p.len() + 16 + ((client as u64 * 7919 + i * 104_729) % 1000) as usize;
    while p.len() < len {
        p.push(b'a' + ((p.len() + client + i as usize) % 26) as u8);
    }
    p.push(b'\n');
    p
}

/// How one exchange on a connection ended.
enum Answer {
    Exact,
    /// EOF before any byte of the answer: resend elsewhere.
    Closed,
    Failed(Failure, String),
}

/// Sends `payload` and reads its echo.
fn ask(s: &mut TcpStream, payload: &[u8]) -> Answer {
    if let Err(e) = s.write_all(payload) {
        return Answer::Failed(classify(&e), format!("write: {e}"));
    }
    let mut got = vec![0u8; payload.len()];
    let mut n = 0;
    while n < got.len() {
        match s.read(&mut got[n..]) {
            Ok(0) if n == 0 => return Answer::Closed,
            Ok(0) => {
                return Answer::Failed(
                    Failure::PartialAnswer,
                    format!("EOF after {n} of {} bytes", payload.len()),
                );
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Answer::Failed(
                    classify(&e),
                    format!("read after {n} of {} bytes: {e}", payload.len()),
                );
            }
        }
    }
    if got == payload {
        Answer::Exact
    } else {
        Answer::Failed(
            Failure::Mismatch,
            format!(
                "sent {:?}, got {:?}",
                String::from_utf8_lossy(payload),
                String::from_utf8_lossy(&got)
            ),
        )
    }
}

/// Whether a kept-alive connection has been closed by the server (its EOF
/// is waiting), looked at without blocking before it is used again.
fn peer_closed(s: &TcpStream) -> Result<bool, (Failure, String)> {
    let mut b = [0u8; 1];
    // SAFETY: recv(2) writes at most 1 byte into `b`, which is valid.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Ok(true),
        n if n > 0 => Err((Failure::Unsolicited, "data before the request".into())),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::Interrupted => Ok(false),
                _ => Err((classify(&e), format!("peek: {e}"))),
            }
        }
    }
}

/// Most times one request is resent after clean closes before it counts as
/// never answered.
const MAX_RESENDS: usize = 50;

/// Echo clients on their own threads until stopped: `persistent` ones keep
/// a connection and send request after request on it; `connectors` open a
/// new connection for every request. Half the persistent ones (even
/// numbers) look for a waiting EOF before reusing their connection, as
/// careful keep-alive clients do; the others send blindly, so requests also
/// race the worker's FIN (which must then drain them, never reset).
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, persistent: usize, connectors: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut threads = Vec::new();
        for c in 0..persistent + connectors {
            let (stop, tally) = (stop.clone(), tally.clone());
            let keep = c < persistent;
            threads.push(std::thread::spawn(move || {
                client(addr, c, keep, &stop, &tally)
            }));
        }
        Load {
            stop,
            tally,
            threads,
        }
    }

    /// Waits until `n` more requests than now have been answered.
    fn wait_more(&self, n: usize, d: &Daemon) {
        let target = self.tally.ok() + n;
        wait_for(DEADLINE, || (self.tally.ok() >= target).then_some(())).unwrap_or_else(|| {
            panic!(
                "clients stuck below {target} answers: {}; log:\n{}",
                self.tally.summary(),
                d.log_text()
            )
        });
    }

    /// Stops the clients and returns what they counted.
    fn finish(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("client thread panicked");
        }
        self.tally
    }
}

fn client(addr: SocketAddr, c: usize, keep: bool, stop: &AtomicBool, tally: &Tally) {
    let mut conn: Option<TcpStream> = None;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let n = i;
        i += 1;
        let payload = payload(c, n);
        let what = |w: &str| format!("client {c} request {n}: {w}");
        let mut failed = false;
        let mut resends = 0;
        loop {
            if resends > MAX_RESENDS {
                tally.fail(Failure::NeverAnswered, what("closed every time"));
                failed = true;
                break;
            }
            if let Some(s) = conn.as_ref().filter(|_| c.is_multiple_of(2)) {
                match peer_closed(s) {
                    Ok(false) => {}
                    Ok(true) => {
                        tally.stale.fetch_add(1, Ordering::SeqCst);
                        conn = None;
                    }
                    Err((f, w)) => {
                        tally.fail(f, what(&w));
                        conn = None;
                        failed = true;
                        break;
                    }
                }
            }
            let s = match &mut conn {
                Some(s) => s,
                None => match connect(addr) {
                    Ok(s) => conn.insert(s),
                    Err(e) => {
                        tally.fail(classify(&e), what(&format!("connect: {e}")));
                        failed = true;
                        break;
                    }
                },
            };
            match ask(s, &payload) {
                Answer::Exact => {
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Answer::Closed => {
                    tally.reconnects.fetch_add(1, Ordering::SeqCst);
                    conn = None;
                    resends += 1;
                }
                Answer::Failed(f, w) => {
                    tally.fail(f, what(&w));
                    conn = None;
                    failed = true;
                    break;
                }
            }
        }
        if !keep {
            conn = None;
        }
        if failed {
            // Already a failed test: do not spin on a dead daemon.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Asserts the clients lost nothing, and returns their summary.
fn assert_nothing_lost(tally: &Tally, d: &Daemon) -> String {
    let summary = tally.summary();
    assert!(
        tally.failures.lock().unwrap().is_empty(),
        "requests failed: {summary}; log:\n{}",
        d.log_text()
    );
    assert!(tally.ok() > 0, "no request was answered: {summary}");
    summary
}

// ---------------------------------------------------------------------------
// Configs and checks.

/// The loaded `echo` service and the `other` one, whose plugin changes.
fn two_services(workers: u32, threads: u32, other: &str, echo_tail: &str) -> String {
    format!(
        "{HEAD}{}{echo_tail}\n{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            &format!("workers = {workers}\nthreads = {threads}\ngraceful_timeout = \"5s\"")
        ),
        service(
            "other",
            &["tcp://127.0.0.1:0"],
            other,
            "workers = 1\ngraceful_timeout = \"5s\""
        )
    )
}

/// Options for echo, which takes none: its workers fail to boot.
const ECHO_OPTIONS: &str = "[service.handler.options]\nfoo = 1\n";

/// The first `lines` lines of RFC 864's pattern, as chargen starts them.
fn chargen_pattern(lines: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for l in 0..lines {
        for c in 0..72 {
            out.push(b' ' + ((l + c) % 95) as u8);
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Checks that `addr` answers the way `plugin` (daytime or chargen) does.
fn check_plugin(addr: SocketAddr, plugin: &str, d: &Daemon) {
    let mut s = connect(addr).unwrap_or_else(|e| panic!("connect to {plugin}: {e}"));
    match plugin {
        "daytime" => {
            let got = read_to_eof(&mut s)
                .unwrap_or_else(|e| panic!("daytime: {e}; log:\n{}", d.log_text()));
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.ends_with(" GMT\r\n") && text.matches('\n').count() == 1,
                "not a daytime answer: {text:?}; log:\n{}",
                d.log_text()
            );
            httpdate::parse_http_date(text.trim_end())
                .unwrap_or_else(|e| panic!("daytime answered {text:?}: {e}"));
        }
        "chargen" => {
            let want = chargen_pattern(4);
            let mut got = vec![0u8; want.len()];
            s.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("chargen: {e}; log:\n{}", d.log_text()));
            assert!(
                got == want,
                "not chargen's pattern: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        _ => unreachable!("{plugin}"),
    }
}

/// Runs `preforkd reload`, which must succeed with generation `generation`.
fn reload_ok(d: &Daemon, generation: u64) {
    let out = cli(d, &["reload"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.starts_with(&format!("reloaded: generation {generation} serving (took ")),
        "reload to generation {generation}: {}; log:\n{}",
        show(&out),
        d.log_text()
    );
}

/// Runs `preforkd reload`, which must fail (exit 1); returns its stderr.
fn reload_fails(d: &Daemon) -> String {
    let out = cli(d, &["reload"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "reload should fail: {}; log:\n{}",
        show(&out),
        d.log_text()
    );
    assert!(
        out.stdout.is_empty(),
        "a failed reload printed: {}",
        show(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The one `preforkd: reload: invalid config: FILE:LINE:COL: message` line
/// of a reload's stderr; checks FILE and LINE, returns (COL, message).
fn invalid_at(stderr: &str, d: &Daemon, line: usize) -> (usize, String) {
    let prefix = format!(
        "preforkd: reload: invalid config: {}:{line}:",
        d.path("preforkd.toml").display()
    );
    let rest = stderr
        .trim_end()
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}COL: ..., got {stderr:?}"));
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    let (col, message) = rest
        .split_once(": ")
        .unwrap_or_else(|| panic!("no column in {stderr:?}"));
    let col: usize = col
        .parse()
        .unwrap_or_else(|_| panic!("column {col:?} in {stderr:?}"));
    (col, message.to_string())
}

/// The worker pids of the master, sorted.
fn sorted_workers(master: i32) -> Vec<i32> {
    let mut w = children(master);
    w.sort();
    w
}

/// The generation number in a worker's title, `preforkd: worker S#N gen G`.
fn title_generation(pid: i32) -> Option<u64> {
    let t = title(pid);
    t.strip_prefix("preforkd: worker ")?
        .rsplit_once(" gen ")?
        .1
        .parse()
        .ok()
}

fn service_of<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name} in {v:#}"))
}

/// The listeners of service `name` in a status document.
fn listeners(v: &Value, name: &str) -> Vec<String> {
    service_of(v, name)["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

/// An echo round trip over a Unix socket.
fn unix_echo(path: &std::path::Path, msg: &[u8]) -> std::io::Result<()> {
    let mut u = UnixStream::connect(path)?;
    u.set_read_timeout(Some(Duration::from_secs(10)))?;
    u.set_write_timeout(Some(Duration::from_secs(10)))?;
    u.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    u.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

/// Prints how long a test took when it ends (also when it fails).
struct Took(&'static str, Instant);

impl Drop for Took {
    fn drop(&mut self) {
        eprintln!("{} took {:?}", self.0, self.1.elapsed());
    }
}

/// The master named in the pid file, after a binary upgrade: not the
/// test's child. The harness kills the daemon's process group, which the new
/// master shares (asserted in `reload_under_load_loses_nothing`); were it
/// ever in a group of its own, this kills that group too. Declare it after
/// the [`Daemon`], so that it is dropped first, while the pid file is
/// current.
struct UpgradedMaster<'a>(&'a Daemon);

impl Drop for UpgradedMaster<'_> {
    fn drop(&mut self) {
        let Some(pid) = pid_file_pid(&self.0.path("preforkd.pid")) else {
            return;
        };
        // SAFETY: getpgid(2) and kill(2) have no memory effects.
        unsafe {
            let pgid = libc::getpgid(pid);
            if pgid > 1 && pgid != self.0.pid() {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The tests.

/// One step of [`reload_under_load_loses_nothing`].
#[derive(Debug, Clone, Copy)]
enum Step {
    Reload {
        workers: u32,
        threads: u32,
        other: &'static str,
    },
    Upgrade,
    /// A TOML syntax error.
    Broken,
    /// Echo with options: its new workers fail to boot.
    Unbootable,
}

/// 16 kept-alive clients and one that connects for every request, across
/// 20 reloads (pool sizes, threads and the other service's plugin change),
/// 3 binary upgrades, a reload of a broken config and one of a generation
/// that cannot boot: not one request is refused, reset, cut short or
/// answered wrongly.
#[test]
fn reload_under_load_loses_nothing() {
    let _took = Took("reload_under_load_loses_nothing", Instant::now());
    // Every persistent connection holds a thread of a worker for as long
    // as it lives: workers x threads stays above the 17 clients.
    let (mut workers, mut threads, mut other) = (2, 12, "daytime");
    let d = Daemon::start(&two_services(workers, threads, other, ""));
    let _upgraded = UpgradedMaster(&d);
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let other_addr = d.addr("tcp", "other");
    check_plugin(other_addr, other, &d);
    let load = Load::start(addr, 16, 1);
    load.wait_more(200, &d);

    let mut steps = Vec::new();
    for k in 1..=20usize {
        steps.push(Step::Reload {
            workers: [3, 4, 2][(k - 1) % 3],
            threads: [16, 12, 10][k % 3],
            other: ["chargen", "daytime"][(k - 1) % 2],
        });
        match k {
            5 | 11 | 17 => steps.push(Step::Upgrade),
            8 => steps.push(Step::Broken),
            14 => steps.push(Step::Unbootable),
            _ => {}
        }
    }

    let mut generation = 1u64;
    let mut master = d.pid();
    let mut reloads = 0u32;
    for step in steps {
        let t = Instant::now();
        match step {
            Step::Reload {
                workers: w,
                threads: th,
                other: o,
            } => {
                (workers, threads, other) = (w, th, o);
                d.write_config(&two_services(workers, threads, other, ""));
                generation += 1;
                reload_ok(&d, generation);
                reloads += 1;
                if reloads.is_multiple_of(3) {
                    // Once the old generation has gone, only the new
                    // plugin can answer.
                    let v = wait_settled(&d);
                    assert_eq!(v["generation"], generation, "{v:#}");
                    check_plugin(other_addr, other, &d);
                }
            }
            Step::Upgrade => {
                let out = cli(&d, &["upgrade"]);
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                let new: i32 = stdout
                    .trim_end()
                    .strip_prefix("upgraded: master pid ")
                    .and_then(|r| r.strip_suffix(&format!(" took over from pid {master}")))
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("upgrade: {}; log:\n{}", show(&out), d.log_text()));
                assert!(out.status.success(), "upgrade: {}", show(&out));
                assert_eq!(pid_file_pid(&d.path("preforkd.pid")), Some(new));
                // Still in the test's process group: the guard kills it.
                // SAFETY: getpgid(2) has no memory effects.
                assert_eq!(unsafe { libc::getpgid(new) }, d.pid());
                master = new;
                generation += 1;
                let v = status(&d);
                assert_eq!(v["pid"], master, "{v:#}");
                assert_eq!(v["generation"], generation, "{v:#}");
            }
            Step::Broken => {
                let good = two_services(workers, threads, other, "");
                let line = good.lines().count() + 1;
                d.write_config(&format!("{good}[[service]\nname = \"late\"\n"));
                generation += 1;
                let err = reload_fails(&d);
                let (col, message) = invalid_at(&err, &d, line);
                assert_eq!(col, "[[service]".len() + 1, "{err}");
                assert!(message.contains("expected `]`"), "{err}");
                d.wait_log(&format!(
                    "reload (generation {generation}) failed: invalid config: "
                ));
            }
            Step::Unbootable => {
                d.write_config(&two_services(workers, threads, other, ECHO_OPTIONS));
                generation += 1;
                let err = reload_fails(&d);
                assert!(
                    err.starts_with("preforkd: reload: worker echo#")
                        && err.contains(" failed to boot: plugin \"echo\" takes no options"),
                    "{err}"
                );
                d.wait_log(&format!("reload (generation {generation}) failed after "));
            }
        }
        eprintln!(
            "{step:?}: {:?}; generation {generation}; {} requests so far",
            t.elapsed(),
            load.tally.ok()
        );
        // Clients are served between steps, not only across them.
        load.wait_more(50, &d);
    }

    // Leave the last generation settled, still under load.
    let v = wait_settled(&d);
    load.wait_more(200, &d);
    let tally = load.finish();
    let summary = assert_nothing_lost(&tally, &d);
    eprintln!("reload_under_load_loses_nothing: {summary}");

    // 1, then 22 reload attempts (2 failed) and 3 upgrades.
    assert_eq!(generation, 26);
    assert_eq!(v["generation"], generation, "{v:#}");
    assert_eq!(v["pid"], master, "{v:#}");
    let echo = service_of(&v, "echo");
    assert_eq!(echo["size"], workers, "{v:#}");
    assert_eq!(status_workers(&v, "echo").len(), workers as usize, "{v:#}");
    assert_eq!(service_of(&v, "other")["plugin"], other, "{v:#}");
    for w in status_workers(&v, "echo") {
        let pid = w["pid"].as_i64().unwrap() as i32;
        assert_eq!(title_generation(pid), Some(generation), "{}", title(pid));
    }
    assert_eq!(title(master), "preforkd: master");
    check_plugin(other_addr, other, &d);
    echo_once(addr, b"after it all").unwrap();
    let log = d.log_text();
    assert_eq!(d.count_log(") succeeded in "), 20, "log:\n{log}");
    assert_eq!(d.count_log(") failed"), 2, "log:\n{log}");
    assert_eq!(d.count_log("upgrade: took over from master pid"), 3);
}

/// A config that does not parse, or does not validate: `preforkd reload`
/// exits 1 naming the file, line and column; the same workers serve on;
/// the attempt still takes a generation number.
#[test]
fn broken_config_changes_nothing() {
    let _took = Took("broken_config_changes_nothing", Instant::now());
    let good = format!(
        "{HEAD}{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\ngraceful_timeout = \"5s\""
        )
    );
    let d = Daemon::start(&good);
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let before = {
        let mut w = d.wait_workers(2);
        w.sort();
        w
    };

    // A TOML syntax error on the last line.
    let line = good.lines().count() + 1;
    d.write_config(&format!("{good}[[service]\nname = \"late\"\n"));
    let err = reload_fails(&d);
    let (col, message) = invalid_at(&err, &d, line);
    assert_eq!(col, "[[service]".len() + 1, "{err}");
    assert!(message.contains("expected `]`"), "{err}");
    let logged = d.wait_log("reload (generation 2) failed: invalid config: ");
    assert!(
        logged.contains(&format!(":{line}:{col}: "))
            && logged.ends_with("; generation 1 keeps serving"),
        "{logged}"
    );

    // A valid TOML file with an invalid value.
    let bad = good.replace("workers = 2", "workers = 0");
    let line = bad.lines().position(|l| l == "workers = 0").unwrap() + 1;
    d.write_config(&bad);
    let err = reload_fails(&d);
    let (col, message) = invalid_at(&err, &d, line);
    assert_eq!(col, "workers = ".len() + 1, "{err}");
    assert!(message.starts_with("workers = 0: "), "{err}");
    d.wait_log("reload (generation 3) failed: invalid config: ");

    // Nothing was forked, nothing stopped.
    assert_eq!(sorted_workers(d.pid()), before, "log:\n{}", d.log_text());
    assert_eq!(d.count_log(") spawned"), 2, "log:\n{}", d.log_text());
    for p in &before {
        assert_eq!(title_generation(*p), Some(1));
    }
    let v = status(&d);
    assert_eq!(v["generation"], 1, "{v:#}");
    assert_eq!(v["reload"]["last"]["ok"], false, "{v:#}");
    assert_eq!(v["reload"]["last"]["generation"], 3, "{v:#}");
    echo_once(addr, b"still served").unwrap();

    // Fixed: the next attempt is generation 4.
    d.write_config(&good);
    reload_ok(&d, 4);
    let v = wait_settled(&d);
    assert_eq!(v["generation"], 4);
    for w in status_workers(&v, "echo") {
        assert!(!before.contains(&(w["pid"].as_i64().unwrap() as i32)));
    }
    echo_once(addr, b"served by generation 4").unwrap();
}

/// A new generation whose workers fail to boot is killed; the listener it
/// added is closed again; the old generation serves on, untouched, and its
/// clients notice nothing.
#[test]
fn unbootable_generation_is_killed_and_old_keeps_serving() {
    let _took = Took(
        "unbootable_generation_is_killed_and_old_keeps_serving",
        Instant::now(),
    );
    let svc = |listen: &[&str], tail: &str| {
        format!(
            "{HEAD}{}{tail}",
            service(
                "echo",
                listen,
                "echo",
                "workers = 2\nthreads = 4\ngraceful_timeout = \"5s\""
            )
        )
    };
    let d = Daemon::start(&svc(&["tcp://127.0.0.1:0"], ""));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let before = {
        let mut w = d.wait_workers(2);
        w.sort();
        w
    };
    let load = Load::start(addr, 3, 1);
    load.wait_more(100, &d);

    d.write_config(&svc(
        &["tcp://127.0.0.1:0", "unix:{dir}/added.sock"],
        ECHO_OPTIONS,
    ));
    let err = reload_fails(&d);
    assert!(
        err.starts_with("preforkd: reload: worker echo#")
            && err.contains(" failed to boot: plugin \"echo\" takes no options, got \"foo\""),
        "{err}"
    );
    let logged = d.wait_log("reload (generation 2) failed after ");
    assert!(
        logged.ends_with("; generation 1 keeps serving") && logged.contains("takes no options"),
        "{logged}"
    );
    d.wait_log("reload (generation 2): listening on unix:");

    // The new generation is gone (killed and reaped), the old one untouched.
    let master = d.pid();
    wait_for(DEADLINE, || {
        (sorted_workers(master) == before).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "workers {:?}, expected {before:?}; log:\n{}",
            sorted_workers(master),
            d.log_text()
        )
    });
    for p in &before {
        assert_eq!(title_generation(*p), Some(1));
    }
    // The listener it bound is closed, its file removed.
    let sock = d.path("added.sock");
    wait_for(DEADLINE, || (!sock.exists()).then_some(()))
        .unwrap_or_else(|| panic!("{} is still there", sock.display()));
    assert!(unix_echo(&sock, b"x").is_err());

    let v = wait_settled(&d);
    assert_eq!(v["generation"], 1, "{v:#}");
    assert_eq!(v["reload"]["last"]["ok"], false, "{v:#}");
    assert_eq!(v["reload"]["last"]["generation"], 2, "{v:#}");
    assert_eq!(listeners(&v, "echo"), [format!("tcp://{addr}")], "{v:#}");
    load.wait_more(100, &d);
    let tally = load.finish();
    let summary = assert_nothing_lost(&tally, &d);
    eprintln!("unbootable_generation_is_killed_and_old_keeps_serving: {summary}");
    assert_eq!(sorted_workers(master), before);
}

/// A reload adds a Unix and a second TCP listener, which serve at once; the
/// next one removes them: the file is removed and the port refuses. The
/// listener that stays refuses nothing throughout.
#[test]
fn listener_added_and_removed_by_reload() {
    let _took = Took("listener_added_and_removed_by_reload", Instant::now());
    let svc = |listen: &[&str]| {
        format!(
            "{HEAD}{}",
            service(
                "echo",
                listen,
                "echo",
                "workers = 2\nthreads = 4\ngraceful_timeout = \"5s\""
            )
        )
    };
    let one = svc(&["tcp://127.0.0.1:0"]);
    let three = svc(&[
        "tcp://127.0.0.1:0",
        "unix:{dir}/added.sock",
        "tcp://127.0.0.1:0",
    ]);
    let d = Daemon::start(&one);
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let stays = format!("tcp://{addr}");
    let load = Load::start(addr, 4, 1);
    load.wait_more(100, &d);

    d.write_config(&three);
    reload_ok(&d, 2);
    let v = status(&d);
    let now = listeners(&v, "echo");
    let unix = format!("unix:{}", d.path("added.sock").display());
    assert_eq!(now.len(), 3, "{v:#}");
    assert_eq!(now[0], stays, "{v:#}");
    assert_eq!(now[1], unix, "{v:#}");
    let added: SocketAddr = now[2]
        .strip_prefix("tcp://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_ne!(added, addr);
    d.wait_log(&format!(
        "reload (generation 2): listening on {unix} (service echo)"
    ));
    d.wait_log(&format!(
        "reload (generation 2): listening on tcp://{added} (service echo)"
    ));
    unix_echo(&d.path("added.sock"), b"over the added unix socket").unwrap();
    echo_once(added, b"over the added tcp port").unwrap();
    load.wait_more(100, &d);

    d.write_config(&one);
    reload_ok(&d, 3);
    // Closed once generation 2, which could still be serving on them, is gone.
    d.wait_log(&format!("no longer listening on {unix}"));
    d.wait_log(&format!("no longer listening on tcp://{added}"));
    let sock = d.path("added.sock");
    wait_for(DEADLINE, || (!sock.exists()).then_some(()))
        .unwrap_or_else(|| panic!("{} is still there; log:\n{}", sock.display(), d.log_text()));
    match connect(added) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!(
            "{added} after its removal: {other:?}; log:\n{}",
            d.log_text()
        ),
    }
    let v = wait_settled(&d);
    assert_eq!(listeners(&v, "echo"), [stays], "{v:#}");
    assert_eq!(d.count_log("no longer listening on"), 2);

    load.wait_more(100, &d);
    let tally = load.finish();
    let summary = assert_nothing_lost(&tally, &d);
    eprintln!("listener_added_and_removed_by_reload: {summary}");
}

/// 50 SIGHUPs in about a second, while a client keeps a generation-1 worker
/// from finishing (it never reads its echo, so the drain lasts until
/// `graceful_timeout`): the HUPs collapse into a pending reload, never
/// more than two generations are alive, and the master settles.
#[test]
fn hup_storm_settles_with_at_most_two_generations() {
    let _took = Took(
        "hup_storm_settles_with_at_most_two_generations",
        Instant::now(),
    );
    let d = Daemon::start(&format!(
        "{HEAD}{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\nthreads = 4\ngraceful_timeout = \"3s\""
        )
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    d.wait_workers(2);
    let master = d.pid();
    let load = Load::start(addr, 4, 1);
    load.wait_more(100, &d);

    // The stuck client: its worker blocks writing the echo back.
    let stuck = stuck_client(addr);

    // The sampler: distinct generations among the master's live children.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut max, mut samples) = (0usize, 0usize);
            let mut worst = BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                // A child not yet titled (just forked) or a zombie has no
                // worker title and counts for nothing.
                let gens: BTreeSet<u64> = children(master)
                    .into_iter()
                    .filter_map(title_generation)
                    .collect();
                if gens.len() > max {
                    max = gens.len();
                    worst = gens;
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (max, samples, worst)
        })
    };

    let storm = Instant::now();
    for _ in 0..50 {
        kill(master, libc::SIGHUP);
        // The storm's pace, not a synchronisation.
        std::thread::sleep(Duration::from_millis(20));
    }
    let storm = storm.elapsed();
    let v = wait_settled(&d);
    stop.store(true, Ordering::SeqCst);
    let (max, samples, worst) = sampler.join().unwrap();
    drop(stuck);

    let generation = v["generation"].as_u64().unwrap();
    let succeeded = d.count_log(") succeeded in ");
    let failed = d.count_log(") failed");
    let joined = d.count_log("SIGHUP: a reload is already pending; this request joins it");
    let queued = d.count_log("SIGHUP: reload queued until");
    eprintln!(
        "50 HUPs in {storm:?}: {succeeded} reloads ran, generation {generation}; {queued} queued, {joined} joined a pending one; at most {max} generations alive at once ({worst:?}) in {samples} samples"
    );
    assert!(
        max <= 2,
        "generations {worst:?} alive at once; log:\n{}",
        d.log_text()
    );
    // The stuck worker kept generation 1 alive next to generation 2: the
    // sampler did see two, so it can see them.
    assert_eq!(max, 2, "{samples} samples; log:\n{}", d.log_text());
    assert_eq!(failed, 0, "log:\n{}", d.log_text());
    assert_eq!(generation, 1 + succeeded as u64, "log:\n{}", d.log_text());
    assert!(
        (1..=5).contains(&succeeded),
        "{succeeded} reloads ran for 50 HUPs; log:\n{}",
        d.log_text()
    );
    assert!(joined + queued >= 1, "log:\n{}", d.log_text());
    // The stuck worker was killed at graceful_timeout.
    assert_eq!(
        d.count_log("still running at its stop deadline; sending SIGKILL"),
        1,
        "log:\n{}",
        d.log_text()
    );
    assert_eq!(status_workers(&v, "echo").len(), 2, "{v:#}");

    echo_once(addr, b"after the storm").unwrap();
    load.wait_more(100, &d);
    let tally = load.finish();
    let summary = assert_nothing_lost(&tally, &d);
    eprintln!("hup_storm_settles_with_at_most_two_generations: {summary}");
}

/// A client that sends much more than the socket buffers hold and reads
/// nothing: the worker that accepted it ends up blocked writing the echo
/// back, and only `graceful_timeout` ends it. Returned once a whole round
/// of writes 20 ms after the last one took nothing.
fn stuck_client(addr: SocketAddr) -> TcpStream {
    let stuck = connect(addr).unwrap();
    stuck.set_nonblocking(true).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    wait_for(DEADLINE, || {
        let mut took = false;
        loop {
            match (&stuck).write(&chunk) {
                Ok(n) => {
                    sent += n;
                    took = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("stuck client: {e}"),
            }
        }
        (sent > 0 && !took).then_some(())
    })
    .expect("the stuck client never filled its connection");
    stuck
}

/// How many threads a process has.
fn threads_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A reload from 2 workers x 1 thread, no max_requests, to 3 x 2 with
/// max_requests = 5: status shows 3 new workers, each with one more thread,
/// 6 connections are served at once, and a worker recycles after 5.
#[test]
fn workers_threads_max_requests_take_effect() {
    let _took = Took("workers_threads_max_requests_take_effect", Instant::now());
    let svc = |extra: &str| {
        format!(
            "{HEAD}{}",
            service(
                "echo",
                &["tcp://127.0.0.1:0"],
                "echo",
                &format!("{extra}\ngraceful_timeout = \"5s\"")
            )
        )
    };
    let d = Daemon::start(&svc("workers = 2\nthreads = 1"));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let v = wait_settled(&d);
    let old: Vec<i32> = status_workers(&v, "echo")
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(old.len(), 2);
    let one_thread = threads_of(old[0]);
    assert!(one_thread >= 1);
    assert!(old.iter().all(|p| threads_of(*p) == one_thread));
    // No max_requests yet: nobody recycles.
    for i in 0..20 {
        echo_once(addr, format!("gen 1 request {i}").as_bytes()).unwrap();
    }

    d.write_config(&svc("workers = 3\nthreads = 2\nmax_requests = 5"));
    reload_ok(&d, 2);
    let v = wait_settled(&d);
    assert_eq!(service_of(&v, "echo")["size"], 3, "{v:#}");
    let new: Vec<i32> = status_workers(&v, "echo")
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(new.len(), 3, "{v:#}");
    let mut titles: Vec<String> = new.iter().map(|p| title(*p)).collect();
    titles.sort();
    assert_eq!(
        titles,
        [
            "preforkd: worker echo#0 gen 2",
            "preforkd: worker echo#1 gen 2",
            "preforkd: worker echo#2 gen 2"
        ]
    );
    for p in &new {
        assert!(!old.contains(p));
        // Accept threads start once the worker has reported ready.
        wait_for(DEADLINE, || {
            (threads_of(*p) == one_thread + 1).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "worker {p} has {} threads, expected {}",
                threads_of(*p),
                one_thread + 1
            )
        });
    }
    assert_eq!(d.count_log("(max_requests); recycling"), 0);

    // 3 workers x 2 threads: 6 connections held open at once, each answered.
    let mut held = Vec::new();
    for i in 0..6 {
        let mut s = connect(addr).unwrap();
        let msg = format!("held {i}");
        s.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("held connection {i}: {e}; log:\n{}", d.log_text()));
        assert_eq!(got, msg.as_bytes());
        held.push(s);
    }
    drop(held);

    // 6 + 20 connections over 3 workers that leave after 5 each.
    for i in 0..20 {
        echo_once(addr, format!("gen 2 request {i}").as_bytes())
            .unwrap_or_else(|e| panic!("request {i}: {e}; log:\n{}", d.log_text()));
    }
    d.wait_log("served 5 requests (max_requests); recycling");
    d.wait_log(") exited with status 0 (recycled)");
    // Workers may still be counting the last connections (and recycle):
    // wait for a settled pool whose titles agree with the status.
    let mut last = Value::Null;
    let now = wait_for(DEADLINE, || {
        last = status(&d);
        let pids: Vec<i32> = status_workers(&last, "echo")
            .iter()
            .map(|w| w["pid"].as_i64().unwrap() as i32)
            .collect();
        let ok = settled(&last)
            && last["generation"] == 2
            && pids.len() == 3
            && pids.iter().all(|p| title_generation(*p) == Some(2));
        ok.then_some(pids)
    })
    .unwrap_or_else(|| panic!("status {last:#}; log:\n{}", d.log_text()));
    assert!(now.iter().any(|p| !new.contains(p)), "nobody was recycled");
    echo_once(addr, b"after recycling").unwrap();
}

/// Reload attempts that fail take a generation number too; a binary upgrade
/// after one must continue after it, not hand the number out again.
///
/// FAILS at the time of writing (a daemon bug): the old master passes the
/// generation *in force* (1) to the new one (`PREFORKD_GENERATION`), not the
/// last number handed out (2), so the new master serves as generation 2:
/// the number the failed reload already had (logged as `reload (generation
/// 2) failed`). After several failed reloads the number even goes back.
#[test]
fn generation_numbers_are_not_reused_across_an_upgrade() {
    let _took = Took(
        "generation_numbers_are_not_reused_across_an_upgrade",
        Instant::now(),
    );
    let good = format!(
        "{HEAD}{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
    );
    let d = Daemon::start(&good);
    let _upgraded = UpgradedMaster(&d);
    d.wait_ready();
    let addr = d.addr("tcp", "echo");

    d.write_config(&format!("{good}[[service]\n"));
    reload_fails(&d);
    d.wait_log("reload (generation 2) failed: invalid config: ");
    assert_eq!(status(&d)["reload"]["last"]["generation"], 2);

    d.write_config(&good);
    let out = cli(&d, &["upgrade"]);
    assert!(out.status.success(), "upgrade: {}", show(&out));
    let v = wait_settled(&d);
    let new = v["pid"].as_i64().unwrap() as i32;
    assert_ne!(new, d.pid());
    echo_once(addr, b"served by the new master").unwrap();
    let w = status_workers(&v, "echo");
    assert_eq!(w.len(), 1);
    assert_eq!(
        v["generation"],
        3,
        "generation 2 was the failed reload's; titles: {}; log:\n{}",
        title(w[0]["pid"].as_i64().unwrap() as i32),
        d.log_text()
    );
}

/// A reload asked for right after a binary upgrade, while the old master's
/// workers still drain, must wait for them like any reload waits for a
/// draining generation: never more than two generations alive.
///
/// FAILS at the time of writing (a daemon bug): the new master only counts
/// its own children as draining, so it starts the reload at once; the old
/// master's generation 1 (held here by a client that never reads, until
/// `graceful_timeout`), the new master's generation 2 and the reload's
/// generation 3 are alive together, and two of them drain.
#[test]
fn reload_right_after_an_upgrade_waits_for_the_old_masters_workers() {
    let _took = Took(
        "reload_right_after_an_upgrade_waits_for_the_old_masters_workers",
        Instant::now(),
    );
    let d = Daemon::start(&format!(
        "{HEAD}{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 1\nthreads = 2\ngraceful_timeout = \"3s\""
        )
    ));
    let _upgraded = UpgradedMaster(&d);
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let first = d.wait_workers(1)[0];
    let stuck = stuck_client(addr);

    let out = cli(&d, &["upgrade"]);
    assert!(out.status.success(), "upgrade: {}", show(&out));
    // Retiring, but held by the stuck client.
    assert!(alive(first), "log:\n{}", d.log_text());
    assert_eq!(title_generation(first), Some(1));
    reload_ok(&d, 3);
    // Generation 3 is ready. Had the reload waited for generation 1 to be
    // gone, as it waits for any draining generation, this worker would be.
    let overlap = alive(first);
    let v = wait_settled(&d);
    wait_for(DEADLINE, || (!alive(first)).then_some(()))
        .expect("the generation-1 worker never left");
    drop(stuck);
    assert_eq!(v["generation"], 3, "{v:#}");
    echo_once(addr, b"still served").unwrap();
    assert!(
        !overlap,
        "generation 3 started while generation 1 (pid {first}) was still alive; log:\n{}",
        d.log_text()
    );
}
