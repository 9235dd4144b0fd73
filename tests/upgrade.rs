//! Binary upgrade (SIGUSR2, `preforkd upgrade`) on the real binary: a Unix
//! and a TCP listener survive upgrades with clients running across them, the
//! pid file names the new master, a new master that cannot boot or is never
//! ready leaves the old one serving untouched, and the edges where the
//! handover still goes wrong (`stop` during an upgrade, files of a config
//! the new master no longer names).
//!
//! After an upgrade `d.child` (the first master) has exited: the current
//! master is the pid in the pid file. Every master of a test is in the
//! first one's process group, which the harness kills on drop.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// Pid file, control socket, and an echo service on TCP and a Unix socket
/// (2 workers x 4 threads, so that persistent clients never starve each
/// other); `daemon` goes into `[daemon]`.
fn config(daemon: &str) -> String {
    format!(
        "[daemon]\npid_file = \"{{dir}}/preforkd.pid\"\n{daemon}\n\n\
         [control]\nsocket = \"{{dir}}/control.sock\"\n\n{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0", "unix:{dir}/echo.sock"],
            "echo",
            "workers = 2\nthreads = 4\ngraceful_timeout = \"10s\"",
        )
    )
}

/// A config whose workers cannot boot: built-in plugins take no options.
fn unbootable(daemon: &str) -> String {
    config(daemon) + "\n[service.handler.options]\nfoo = 1\n"
}

/// Waits until `pid` is gone (a zombie counts as gone: a master that is
/// not our child is reaped by whoever inherited it).
fn wait_gone(d: &Daemon, pid: i32, what: &str) {
    wait_for(DEADLINE, || (!alive(pid)).then_some(())).unwrap_or_else(|| {
        panic!(
            "{what} (pid {pid}, {:?}) is still running; log:\n{}",
            title(pid),
            d.log_text()
        )
    });
}

/// The pid in the log line `upgrade: started PROGRAM as master pid PID`
/// (the `n`th such line, from 1).
fn started_master(d: &Daemon, n: usize) -> (String, i32) {
    let line = wait_for(DEADLINE, || {
        d.log_text()
            .lines()
            .filter(|l| l.contains("upgrade: started "))
            .nth(n - 1)
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("no upgrade #{n} started; log:\n{}", d.log_text()));
    let rest = &line[line.find("upgrade: started ").unwrap() + "upgrade: started ".len()..];
    let (program, rest) = rest.split_once(" as master pid ").unwrap();
    let pid = rest.split(',').next().unwrap().trim().parse().unwrap();
    (program.to_string(), pid)
}

fn inode(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

/// One echo exchange on a new Unix connection.
fn unix_echo(path: &Path, payload: &[u8]) -> Result<(), String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    (got == payload).then_some(()).ok_or("mismatch".into())
}

/// Echo answers on both listeners, now.
fn assert_serves(d: &Daemon, tcp: SocketAddr, what: &str) {
    echo_once(tcp, format!("tcp {what}\n").as_bytes())
        .unwrap_or_else(|e| panic!("TCP echo {what}: {e}; log:\n{}", d.log_text()));
    unix_echo(&d.path("echo.sock"), format!("unix {what}\n").as_bytes())
        .unwrap_or_else(|e| panic!("Unix echo {what}: {e}; log:\n{}", d.log_text()));
}

// ---------------------------------------------------------------------------
// Clients that run across upgrades.

/// How one exchange went.
enum Exchange {
    Answered,
    /// A clean EOF before any byte of the answer: a retiring worker closed
    /// at a request boundary. Not a failure: reconnect and resend.
    ClosedAtBoundary,
}

/// Sends `msg` on `s` and reads the echo. Err names the kind of failure:
/// reset, early EOF (part of an answer), timeout, mismatch.
fn exchange(s: &mut (impl Read + Write), msg: &[u8]) -> Result<Exchange, String> {
    if let Err(e) = s.write_all(msg) {
        return Err(match e.kind() {
            ErrorKind::ConnectionReset => format!("reset on write: {e}"),
            _ => format!("write: {e}"),
        });
    }
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < msg.len() {
        match s.read(&mut got[n..]) {
            Ok(0) if n == 0 => return Ok(Exchange::ClosedAtBoundary),
            Ok(0) => return Err(format!("early EOF after {n} of {} bytes", msg.len())),
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Err(format!("reset after {n} bytes: {e}"));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("timeout after {n} bytes: {e}"));
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if got == msg {
        Ok(Exchange::Answered)
    } else {
        Err(format!(
            "mismatch: sent {:?}, got {:?}",
            String::from_utf8_lossy(msg),
            String::from_utf8_lossy(&got)
        ))
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientReport {
    name: String,
    answered: u64,
    /// Clean closes at a request boundary (then reconnected and resent).
    reconnects: u64,
    failures: Vec<String>,
}

/// At most this many clean closes in a row for one request before it
/// counts as a failure (a worker that closes every new connection).
const MAX_CLOSES_IN_A_ROW: u32 = 50;

/// Echo clients running until stopped: on the Unix socket over persistent
/// connections, on TCP over a new connection per request.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<ClientReport>>,
}

impl Load {
    fn start(unix: &Path, tcp: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in 0..2 {
            let (stop, answered, path) = (stop.clone(), answered.clone(), unix.to_owned());
            threads.push(std::thread::spawn(move || {
                unix_client(format!("unix#{i}"), &path, &stop, &answered)
            }));
        }
        for i in 0..2 {
            let (stop, answered) = (stop.clone(), answered.clone());
            threads.push(std::thread::spawn(move || {
                tcp_client(format!("tcp#{i}"), tcp, &stop, &answered)
            }));
        }
        Load {
            stop,
            answered,
            threads,
        }
    }

    /// Waits until `n` more requests have been answered.
    fn wait_progress(&self, d: &Daemon, n: u64, what: &str) {
        let from = self.answered.load(Ordering::SeqCst);
        wait_for(DEADLINE, || {
            (self.answered.load(Ordering::SeqCst) >= from + n).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "the clients got {} answers {what} (wanted {n}); log:\n{}",
                self.answered.load(Ordering::SeqCst) - from,
                d.log_text()
            )
        });
    }

    fn finish(mut self) -> Vec<ClientReport> {
        self.stop.store(true, Ordering::SeqCst);
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().expect("a client thread panicked"))
            .collect()
    }
}

impl Drop for Load {
    /// A failing test stops its clients too (they would spin on refusals).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn unix_client(name: String, path: &Path, stop: &AtomicBool, answered: &AtomicU64) -> ClientReport {
    let mut r = ClientReport {
        name,
        ..ClientReport::default()
    };
    let mut conn: Option<UnixStream> = None;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let msg = format!("{} request {i}\n", r.name);
        let mut closes = 0;
        let outcome = loop {
            if conn.is_none() {
                match UnixStream::connect(path) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                        conn = Some(s);
                    }
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        break Err(format!("refused: {e}"));
                    }
                    Err(e) => break Err(format!("connect: {e}")),
                }
            }
            match exchange(conn.as_mut().unwrap(), msg.as_bytes()) {
                Ok(Exchange::Answered) => break Ok(()),
                Ok(Exchange::ClosedAtBoundary) => {
                    conn = None;
                    r.reconnects += 1;
                    closes += 1;
                    if closes >= MAX_CLOSES_IN_A_ROW {
                        break Err(format!("closed {closes} times in a row before an answer"));
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match outcome {
            Ok(()) => {
                r.answered += 1;
                answered.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                r.failures.push(format!("{}: request {i}: {e}", r.name));
                conn = None;
                // Not a hot loop against a dead daemon.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        i += 1;
    }
    r
}

fn tcp_client(
    name: String,
    addr: SocketAddr,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> ClientReport {
    let mut r = ClientReport {
        name,
        ..ClientReport::default()
    };
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let msg = format!("{} request {i}\n", r.name);
        let mut closes = 0;
        let outcome = loop {
            let mut s = match connect(addr) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    break Err(format!("refused: {e}"));
                }
                Err(e) => break Err(format!("connect: {e}")),
            };
            match exchange(&mut s, msg.as_bytes()) {
                Ok(Exchange::Answered) => break Ok(()),
                Ok(Exchange::ClosedAtBoundary) => {
                    r.reconnects += 1;
                    closes += 1;
                    if closes >= MAX_CLOSES_IN_A_ROW {
                        break Err(format!("closed {closes} times in a row before an answer"));
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match outcome {
            Ok(()) => {
                r.answered += 1;
                answered.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                r.failures.push(format!("{}: request {i}: {e}", r.name));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        i += 1;
    }
    r
}

// ---------------------------------------------------------------------------
// A binary the test can replace: what an upgrade runs is the file at the
// path the master was started from.

/// Starts preforkd from a copy of the binary at DIR/bin/preforkd, with
/// `config` at DIR/preforkd.toml. Returns the daemon and that path.
fn start_copied(config: &str) -> (Daemon, PathBuf) {
    let dir = tempdir();
    let exe = dir.path().join("bin/preforkd");
    fs::create_dir(dir.path().join("bin")).unwrap();
    copy_executable(&bin(), &exe);
    let cfg = dir.path().join("preforkd.toml");
    fs::write(&cfg, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.arg("-c").arg(&cfg);
    (Daemon::spawn(cmd, dir, &[]), exe)
}

/// Copies `from` to a new executable `to` in a child process (`cp`), so
/// that this test process never holds a descriptor open for writing `to`:
/// its other threads fork all the time, and a child still holding such a
/// descriptor (until it execs) makes exec(2) of `to` fail with ETXTBSY.
/// `spawn_retrying` covers our own spawns; the master's exec of the file
/// in an upgrade has no retry.
fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp {} {}: {status}",
        from.display(),
        to.display()
    );
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Replaces `path` as a package manager does: a new file renamed over it
/// (the running binary keeps its old inode).
fn replace_file(path: &Path, contents: &[u8]) {
    // Written here (never executed), then copied to the file that is.
    let src = path.with_extension("src");
    fs::write(&src, contents).unwrap();
    let tmp = path.with_extension("new");
    copy_executable(&src, &tmp);
    fs::rename(&tmp, path).unwrap();
}

/// Replaces `path` with a fresh copy of the real binary (a new inode).
fn replace_with_real_binary(path: &Path) {
    let tmp = path.with_extension("new");
    copy_executable(&bin(), &tmp);
    fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------

#[test]
fn unix_and_tcp_listeners_survive_an_upgrade() {
    let mut d = Daemon::start(&config("upgrade_timeout = \"60s\""));
    d.wait_ready();
    let cfg = d.path("preforkd.toml");
    let pid_file = d.path("preforkd.pid");
    let sock = d.path("echo.sock");
    let first = d.pid();
    let sock_ino = inode(&sock);
    let tcp = d.addr("tcp", "echo");
    let load = Load::start(&sock, tcp);
    load.wait_progress(&d, 100, "before the upgrade");

    // Upgrade #1, with the clients running.
    let t = Instant::now();
    let out = run_cli(&cfg, &["upgrade"]);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "upgrade: {}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let second = pid_file_pid(&pid_file).expect("a pid in the pid file");
    assert_ne!(second, first, "the pid file still names the old master");
    assert_eq!(
        stdout(&out),
        format!("upgraded: master pid {second} took over from pid {first}\n")
    );
    assert!(alive(second), "the new master {second} is not running");
    assert_eq!(title(second), "preforkd: master");
    // The old master leaves, cleanly, once its workers have drained.
    let code = d.wait_exit(DEADLINE).code();
    assert_eq!(code, Some(0), "old master exit; log:\n{}", d.log_text());
    d.wait_log(&format!(
        "master pid {first} exiting; master pid {second} carries on"
    ));
    // The same socket (adopted, not bound again) is still there, still served.
    assert_eq!(inode(&sock), sock_ino, "the Unix socket file was replaced");
    d.wait_log(&format!("adopted unix:{}", sock.display()));
    load.wait_progress(&d, 100, "after the old master exited");
    assert_serves(&d, tcp, "after upgrade 1");

    // The control socket reaches the new master, generation 2.
    let v = wait_status_at(&cfg, &d, "the master settled", settled);
    assert_eq!(v["pid"], second, "{v:#}");
    assert_eq!(v["generation"], 2, "{v:#}");
    assert_eq!(v["upgrade"]["previous_master_draining"], false, "{v:#}");
    let mut listed: Vec<i32> = status_workers(&v, "echo")
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    listed.sort();
    let mut kids = children(second);
    kids.sort();
    assert_eq!(listed, kids, "status workers vs the new master's children");
    for w in status_workers(&v, "echo") {
        let pid = w["pid"].as_i64().unwrap() as i32;
        assert_eq!(
            title(pid),
            format!("preforkd: worker {} gen 2", w["name"].as_str().unwrap())
        );
    }

    // Upgrade #2, from the new master.
    let out = run_cli(&cfg, &["upgrade"]);
    assert!(
        out.status.success(),
        "second upgrade: {}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let third = pid_file_pid(&pid_file).expect("a pid in the pid file");
    assert!(third != second && third != first, "pid file: {third}");
    assert_eq!(
        stdout(&out),
        format!("upgraded: master pid {third} took over from pid {second}\n")
    );
    wait_gone(&d, second, "the second master");
    d.wait_log(&format!(
        "master pid {second} exiting; master pid {third} carries on"
    ));
    load.wait_progress(&d, 100, "after the second upgrade");
    let v = wait_status_at(&cfg, &d, "the master settled", settled);
    assert_eq!(v["pid"], third, "{v:#}");
    assert_eq!(v["generation"], 3, "{v:#}");
    assert_eq!(inode(&sock), sock_ino, "the Unix socket file was replaced");

    let reports = load.finish();
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    assert!(
        failures.is_empty(),
        "{} failed requests across two upgrades: {failures:#?}\nclients: {reports:?}\nlog:\n{}",
        failures.len(),
        d.log_text()
    );
    // Every persistent connection was on a retiring generation twice: each
    // client must have been closed on (and reconnected) at least twice, or
    // it did not really run across both upgrades.
    for r in reports.iter().filter(|r| r.name.starts_with("unix")) {
        assert!(r.reconnects >= 2, "{r:?}");
    }
    eprintln!(
        "upgrade took {took:?}; clients: {}",
        reports
            .iter()
            .map(|r| format!(
                "{} {} answered, {} reconnects",
                r.name, r.answered, r.reconnects
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );

    // Stopping the last master removes what the first one created.
    let out = run_cli(&cfg, &["stop"]);
    assert!(out.status.success(), "stop: {}", show(&out));
    assert_eq!(
        stdout(&out),
        format!("stopped: master pid {third} has exited\n")
    );
    wait_gone(&d, third, "the third master");
    for f in ["echo.sock", "control.sock", "preforkd.pid"] {
        assert!(
            fs::symlink_metadata(d.path(f)).is_err(),
            "{f} is still there after the stop; log:\n{}",
            d.log_text()
        );
    }
}

#[test]
fn failed_upgrade_keeps_the_old_master() {
    let mut d = Daemon::start(&config("upgrade_timeout = \"60s\""));
    d.wait_ready();
    let cfg = d.path("preforkd.toml");
    let pid_file = d.path("preforkd.pid");
    let tcp = d.addr("tcp", "echo");
    let master = d.pid();
    let mut workers = d.wait_workers(2);
    workers.sort();
    let sock_ino = inode(&d.path("echo.sock"));
    let load = Load::start(&d.path("echo.sock"), tcp);
    load.wait_progress(&d, 50, "before the upgrade");

    // The file the new master will read: its workers cannot initialise.
    d.write_config(&unbootable("upgrade_timeout = \"60s\""));
    let out = run_cli(&cfg, &["upgrade"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "upgrade: {}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let err = stderr(&out);
    assert!(
        err.starts_with("preforkd: upgrade: ")
            && err.contains("plugin \"echo\" takes no options, got \"foo\""),
        "{}",
        show(&out)
    );
    let (_, failed) = started_master(&d, 1);
    wait_gone(&d, failed, "the new master that failed");
    let line = d.wait_log("upgrade failed");
    assert!(
        line.contains(&format!("master pid {master} keeps serving generation 1")),
        "{line}"
    );
    // Nothing changed: pid file, master, workers, socket file, service.
    assert_eq!(pid_file_pid(&pid_file), Some(master));
    assert!(alive(master));
    let mut now = d.wait_workers(2);
    now.sort();
    assert_eq!(now, workers, "the old workers were replaced");
    for w in &workers {
        assert!(title(*w).ends_with(" gen 1"), "{w}: {:?}", title(*w));
    }
    assert_eq!(inode(&d.path("echo.sock")), sock_ino);
    load.wait_progress(&d, 50, "after the failed upgrade");
    assert_serves(&d, tcp, "after the failed upgrade");
    let v = wait_status_at(&cfg, &d, "the master settled", settled);
    assert_eq!(
        (v["pid"].as_i64(), v["generation"].as_i64()),
        (Some(master as i64), Some(1)),
        "{v:#}"
    );
    let reports = load.finish();
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    assert!(
        failures.is_empty(),
        "failed requests across the failed upgrade: {failures:#?}\nlog:\n{}",
        d.log_text()
    );

    // With the config fixed, the next upgrade goes through.
    d.write_config(&config("upgrade_timeout = \"60s\""));
    let out = run_cli(&cfg, &["upgrade"]);
    assert!(
        out.status.success(),
        "upgrade after the fix: {}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let new = pid_file_pid(&pid_file).unwrap();
    assert_ne!(new, master);
    assert_eq!(
        d.wait_exit(DEADLINE).code(),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let v = wait_status_at(&cfg, &d, "the master settled", settled);
    assert_eq!(v["pid"], new, "{v:#}");
    assert_serves(&d, tcp, "after the second upgrade");
}

#[test]
fn sigusr2_upgrades_too() {
    let mut d = Daemon::start(&config("upgrade_timeout = \"60s\""));
    d.wait_ready();
    let cfg = d.path("preforkd.toml");
    let tcp = d.addr("tcp", "echo");
    let old = d.pid();
    d.signal(libc::SIGUSR2);
    let new = wait_for(DEADLINE, || {
        pid_file_pid(&d.path("preforkd.pid")).filter(|p| *p != old)
    })
    .unwrap_or_else(|| panic!("the pid file still names {old}; log:\n{}", d.log_text()));
    d.wait_log("SIGUSR2: binary upgrade requested");
    assert_eq!(
        d.wait_exit(DEADLINE).code(),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    assert_eq!(title(new), "preforkd: master");
    let v = wait_status_at(&cfg, &d, "the master settled", settled);
    assert_eq!(
        (v["pid"].as_i64(), v["generation"].as_i64()),
        (Some(new as i64), Some(2)),
        "{v:#}"
    );
    assert_serves(&d, tcp, "after SIGUSR2");
}

/// `upgrade_timeout`: the file at the master's path is replaced by a
/// program that never gets ready (a stand-in for a new binary that hangs
/// at start). The old master kills it after the timeout and serves on;
/// once the file is a real binary again, the upgrade runs that new file.
#[test]
fn upgrade_timeout_kills_a_new_master_that_is_never_ready() {
    let (d, exe) = start_copied(&config("upgrade_timeout = \"2s\""));
    d.wait_ready();
    let cfg = d.path("preforkd.toml");
    let tcp = d.addr("tcp", "echo");
    let master = d.pid();
    let mut workers = d.wait_workers(2);
    workers.sort();

    replace_file(&exe, b"#!/bin/sh\nexec sleep 600\n");
    let out = run_cli(&cfg, &["upgrade"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "upgrade: {}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let (program, hung) = started_master(&d, 1);
    assert_eq!(program, exe.display().to_string(), "the path it ran");
    assert!(
        stderr(&out).contains(&format!(
            "new master pid {hung} not ready within upgrade_timeout (2s)"
        )),
        "{}",
        show(&out)
    );
    wait_gone(&d, hung, "the new master that was never ready");
    let line = d.wait_log("upgrade failed after");
    assert!(
        line.contains(&format!("master pid {master} keeps serving generation 1")),
        "{line}"
    );
    assert_eq!(pid_file_pid(&d.path("preforkd.pid")), Some(master));
    let mut now = d.wait_workers(2);
    now.sort();
    assert_eq!(now, workers, "the old workers were replaced");
    assert_serves(&d, tcp, "after the timed-out upgrade");
    let v = wait_status_at(&cfg, &d, "the master settled", settled);
    assert_eq!(v["pid"], master, "{v:#}");

    // A real (new) binary at the path again, and time enough for it (a
    // reload applies upgrade_timeout): the upgrade runs the new file.
    replace_with_real_binary(&exe);
    let running = fs::read_link(format!("/proc/{master}/exe")).unwrap();
    assert!(
        running.to_string_lossy().ends_with(" (deleted)"),
        "{running:?}"
    );
    d.write_config(&config("upgrade_timeout = \"60s\""));
    let out = run_cli(&cfg, &["reload"]);
    assert!(out.status.success(), "reload: {}", show(&out));
    wait_status_at(&cfg, &d, "the master settled", settled);
    let out = run_cli(&cfg, &["upgrade"]);
    assert!(
        out.status.success(),
        "upgrade: {}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let new = pid_file_pid(&d.path("preforkd.pid")).unwrap();
    assert_ne!(new, master);
    assert_eq!(fs::read_link(format!("/proc/{new}/exe")).unwrap(), exe);
    wait_gone(&d, master, "the old master");
    assert_serves(&d, tcp, "after the upgrade to the new file");
}

/// Regression (failed before a8f23b7): a `stop` sent while an upgrade is
/// in progress could be answered by the new master while it was still
/// booting: it stopped itself, said `stopped: master pid NEW has exited`,
/// the old master counted the upgrade as failed and kept serving, so the
/// daemon ran on after a successful `stop`. Both masters poll the inherited
/// control socket from the new master's start, so which one accepts is a
/// race; this test fixes the interleaving: the new master is held (SIGSTOP)
/// before it execs, the old one is held while the `stop` is queued on the
/// control socket, so only the booting new master can take it.
///
/// Either answer is fine if it is true: `stopped` and then nothing runs,
/// or a refusal (`still taking over`), the upgrade completes, and a `stop`
/// after it stops everything.
#[test]
fn stop_during_an_upgrade_stops_the_daemon() {
    // Under load the new master's workers may all be ready before it reads
    // the `stop`: it is in charge then, the stop is right, and the window
    // this test aims at was missed. Three tries make a miss unlikely.
    for attempt in 1..=3 {
        stop_during_an_upgrade(attempt);
    }
}

fn stop_during_an_upgrade(attempt: u32) {
    let (d, exe) = start_copied(&config("upgrade_timeout = \"60s\""));
    d.wait_ready();
    let tcp = d.addr("tcp", "echo");
    let old = d.pid();
    // The next "binary": stops itself, then runs the real one.
    let wrapper = format!(
        "#!/bin/sh\nkill -STOP $$\nexec '{}' \"$@\"\n",
        bin().display()
    );
    replace_file(&exe, wrapper.as_bytes());

    let control = |line: &[u8]| {
        let mut s = UnixStream::connect(d.path("control.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(line).unwrap();
        s
    };
    let upgrade = control(b"upgrade\n");
    let (_, new) = started_master(&d, 1);
    wait_for(DEADLINE, || (state(new) == Some('T')).then_some(()))
        .unwrap_or_else(|| panic!("the wrapper {new} did not stop itself"));
    // SAFETY: kill(2) has no memory effects; both are ours (our group).
    unsafe { libc::kill(old, libc::SIGSTOP) };
    wait_for(DEADLINE, || (state(old) == Some('T')).then_some(()))
        .unwrap_or_else(|| panic!("the old master {old} did not stop"));
    // Queued on the control socket: only the new master can take it now.
    let stop = control(b"stop\n");
    // SAFETY: as above.
    unsafe { libc::kill(new, libc::SIGCONT) };
    let mut answer = String::new();
    let read = BufReader::new(&stop).read_line(&mut answer);
    // SAFETY: as above.
    unsafe { libc::kill(old, libc::SIGCONT) };
    read.unwrap_or_else(|e| panic!("no answer to stop: {e}; log:\n{}", d.log_text()));
    let v: serde_json::Value = serde_json::from_str(&answer)
        .unwrap_or_else(|e| panic!("{e}: {answer:?}; log:\n{}", d.log_text()));
    let mut up = String::new();
    let _ = BufReader::new(&upgrade).read_line(&mut up);

    if v["ok"] == true {
        // `stop` said it stopped: then nothing may serve any more.
        let gone = wait_for(DEADLINE, || (!alive(old) && !alive(new)).then_some(()));
        assert!(
            gone.is_some(),
            "attempt {attempt}: `stop` answered {v} during an upgrade (the upgrade got {up:?}), \
             but master pid {old} ({:?}) still runs{}; log:\n{}",
            title(old),
            if echo_once(tcp, b"still here\n").is_ok() {
                " and serves"
            } else {
                ""
            },
            d.log_text()
        );
        eprintln!("attempt {attempt}: stop during the upgrade: {v}; both masters gone");
        return;
    }
    // Refused: the upgrade goes on, and a stop once it is done stops all.
    eprintln!("attempt {attempt}: stop during the upgrade refused: {v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("still taking over from master pid {old}"))),
        "{v}"
    );
    let up: serde_json::Value = serde_json::from_str(&up)
        .unwrap_or_else(|e| panic!("upgrade answer {up:?}: {e}; log:\n{}", d.log_text()));
    assert_eq!(up["ok"], true, "upgrade: {up}; log:\n{}", d.log_text());
    assert_eq!(up["new_pid"], new, "{up}");
    wait_gone(&d, old, "the old master");
    let out = run_cli(&d.path("preforkd.toml"), &["stop"]);
    assert!(out.status.success(), "stop: {}", show(&out));
    wait_gone(&d, new, "the new master");
    for f in ["echo.sock", "control.sock", "preforkd.pid"] {
        assert!(fs::symlink_metadata(d.path(f)).is_err(), "{f} left");
    }
}

/// Regression (failed before a8f23b7): a binary upgrade applies a new
/// config's `[daemon] pid_file` and `[control] socket` (a reload does
/// not), but the files of the old config stayed behind: the old master
/// exited without removing its pid file or control socket, and a Unix
/// listener the new config dropped kept its socket file (a reload removes
/// it). They outlived the new master's stop too: a pid file naming a dead
/// pid, sockets that refuse connections.
#[test]
fn upgrade_removes_files_the_new_config_no_longer_names() {
    let old_config = |dir: &str| {
        format!(
            "[daemon]\npid_file = \"{dir}/a.pid\"\n[control]\nsocket = \"{dir}/a.sock\"\n\n{}",
            service(
                "echo",
                &["tcp://127.0.0.1:0", &format!("unix:{dir}/echo.sock")],
                "echo",
                "workers = 1"
            )
        )
    };
    let mut d = Daemon::start(&old_config("{dir}"));
    d.wait_ready();
    let dir = d.dir.path().to_str().unwrap().to_string();
    // The old config stays at hand for the CLI (it names a.sock).
    let a_toml = d.path("a.toml");
    fs::write(&a_toml, old_config(&dir)).unwrap();
    let old = d.pid();
    d.write_config(&format!(
        "[daemon]\npid_file = \"{{dir}}/b.pid\"\n[control]\nsocket = \"{{dir}}/b.sock\"\n\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
    ));
    let out = run_cli(&a_toml, &["upgrade"]);
    assert!(
        out.status.success(),
        "upgrade: {}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let new = pid_file_pid(&d.path("b.pid")).expect("the new master writes b.pid");
    assert_eq!(
        d.wait_exit(DEADLINE).code(),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let cfg = d.path("preforkd.toml");
    let v = wait_status_at(&cfg, &d, "the master settled", settled);
    assert_eq!(v["pid"], new);

    let leftovers = |when: &str| -> Vec<String> {
        let mut left = Vec::new();
        if let Some(pid) = pid_file_pid(&d.path("a.pid")) {
            left.push(format!(
                "{when}: a.pid names pid {pid} ({})",
                if alive(pid) { "running" } else { "gone" }
            ));
        }
        for f in ["a.sock", "echo.sock"] {
            if fs::symlink_metadata(d.path(f)).is_ok() {
                let connect = UnixStream::connect(d.path(f))
                    .map(|_| "accepts".to_string())
                    .unwrap_or_else(|e| e.to_string());
                left.push(format!("{when}: {f} (connect: {connect})"));
            }
        }
        left
    };
    let mut left = leftovers("after the upgrade");
    let out = run_cli(&cfg, &["stop"]);
    assert!(out.status.success(), "stop: {}", show(&out));
    wait_gone(&d, new, "the new master");
    for f in ["b.pid", "b.sock"] {
        assert!(fs::symlink_metadata(d.path(f)).is_err(), "{f} left");
    }
    left.extend(leftovers("after the new master's stop"));
    assert!(
        left.is_empty(),
        "files of the old config (master pid {old}) left behind: {left:#?}\nlog:\n{}",
        d.log_text()
    );
}
