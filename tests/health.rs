//! Stuck workers (`timeout`) and slow clients (`idle_timeout`), with test
//! plugins that hang.
//!
//! This file has its own `main` (`harness = false` in Cargo.toml). With
//! `PREFORKD_TEST_DAEMON=1` in its environment the test binary *is* a
//! preforkd daemon with the built-in plugins and these:
//!
//! - `hang`: echo of lines; a line `hang` makes the handler sleep for ever,
//!   deaf to the stop (a deadlock, as far as the master can tell).
//! - `hangtight`: the same, and its factory ignores SIGABRT: the master
//!   has to escalate to SIGKILL.
//!
//! Core dumps are turned off (RLIMIT_CORE 0, inherited by the daemon): the
//! SIGABRT of a stuck worker would otherwise write one per test.

mod common;

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use common::*;
use preforkd::handler::{Connection, Handlers, PluginInfo, Recv, Registry, StreamHandler};

/// The environment variable that turns this binary into a daemon.
const DAEMON_ENV: &str = "PREFORKD_TEST_DAEMON";

/// Echoes lines; hangs for ever on `hang`.
struct Hang;

impl StreamHandler for Hang {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let mut line = Vec::new();
        loop {
            line.clear();
            match conn.recv_line(&mut line, 4096)? {
                Recv::Data(_) if line.starts_with(b"hang") => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
                Recv::Data(_) => conn.write_all(&line)?,
                Recv::Eof | Recv::Shutdown => return Ok(()),
            }
        }
    }
}

fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register(PluginInfo::new("hang", "test plugin", |_ctx| {
        Ok(Handlers::stream(Hang))
    }));
    r.register(PluginInfo::new("hangtight", "test plugin", |_ctx| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no
        // handler code; the worker is single-threaded here (the factory
        // runs before the accept threads).
        unsafe { libc::signal(libc::SIGABRT, libc::SIG_IGN) };
        Ok(Handlers::stream(Hang))
    }));
    r
}

/// Starts this binary as a daemon with the test plugins, with a control
/// socket before `services`.
fn start(services: &str) -> Daemon {
    let exe = std::env::current_exe().expect("current_exe");
    let config = format!("[control]\nsocket = \"{{dir}}/control.sock\"\n\n{services}");
    Daemon::start_bin(&exe, &config, &[(DAEMON_ENV, "1")])
}

/// The pid of the only worker of `service`, once it is idle.
fn idle_worker(d: &Daemon, service: &str) -> i64 {
    let v = wait_status(d, &format!("an idle worker of {service}"), |v| {
        let w = status_workers(v, service);
        w.len() == 1 && w[0]["state"] == "idle"
    });
    status_workers(&v, service)[0]["pid"].as_i64().unwrap()
}

/// The `N.Ns` after `stuck for ` (or `stopped `) in a log line.
fn seconds_after(line: &str, marker: &str) -> f64 {
    let rest = &line[line
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} in {line}"))
        + marker.len()..];
    rest[..rest.find('s').unwrap()].parse().unwrap()
}

/// Whether the connection was closed (EOF or reset) rather than answered.
fn closed(s: &mut impl Read) -> bool {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}

fn hang_is_killed_after_timeout_and_replaced() {
    let d = start(
        &(service(
            "hang",
            &["tcp://127.0.0.1:0"],
            "hang",
            "workers = 1\ntimeout = \"2s\"",
        ) + &service(
            "tight",
            &["tcp://127.0.0.1:0"],
            "hangtight",
            "workers = 1\ntimeout = \"2s\"",
        )),
    );
    d.wait_ready();
    let addr = d.addr("tcp", "hang");
    echo_once(addr, b"hello\n").unwrap();
    let old = idle_worker(&d, "hang");

    let mut c = connect(addr).unwrap();
    let peer = c.local_addr().unwrap();
    c.write_all(b"hang\n").unwrap();
    let sent = Instant::now();
    // Status shows the connection, with the peer, while it lasts.
    wait_status(&d, "the hung connection", |v| {
        status_workers(v, "hang").iter().any(|w| {
            w["state"] == "busy"
                && w["connections"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["peer"] == peer.to_string()))
        })
    });
    let line = d.wait_log("stuck for");
    assert!(
        line.contains(&format!(
            "WARN: service hang: worker hang#0 (pid {old}) stuck for "
        )) && line.ends_with(&format!(" on {peer} (timeout 2s); sending SIGABRT")),
        "{line}"
    );
    let stuck = seconds_after(&line, "stuck for ");
    assert!(stuck >= 2.0, "killed after {stuck}s, timeout 2s: {line}");
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "killed {:?} after the hang",
        sent.elapsed()
    );
    d.wait_log(&format!(
        "worker hang#0 (pid {old}) killed by signal SIGABRT"
    ));
    assert!(closed(&mut c), "the hung client's connection is still open");
    // Replaced: a new worker serves.
    let new = idle_worker(&d, "hang");
    assert_ne!(new, old);
    echo_once(addr, b"after\n").unwrap();

    // A worker that ignores SIGABRT gets SIGKILL after the grace.
    let tight = d.addr("tcp", "tight");
    let old = idle_worker(&d, "tight");
    let mut c = connect(tight).unwrap();
    c.write_all(b"hang\n").unwrap();
    d.wait_log(&format!("worker tight#0 (pid {old}) stuck for "));
    d.wait_log(&format!(
        "worker tight#0 (pid {old}) still running 2s after SIGABRT; sending SIGKILL"
    ));
    d.wait_log(&format!(
        "worker tight#0 (pid {old}) killed by signal SIGKILL"
    ));
    assert_ne!(idle_worker(&d, "tight"), old);
    echo_once(tight, b"after\n").unwrap();
    assert!(alive(d.pid()));
}

fn stopped_heartbeat_is_killed_and_replaced() {
    let d = start(&service(
        "echo",
        &["tcp://127.0.0.1:0"],
        "echo",
        "workers = 1\ntimeout = \"2s\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let old = idle_worker(&d, "echo");
    // A live idle worker's heartbeat stays fresh past the timeout: time
    // must pass here, it is what is observed.
    std::thread::sleep(Duration::from_millis(2500));
    let v = status(&d);
    let beat = status_workers(&v, "echo")[0]["heartbeat_age_ms"]
        .as_u64()
        .unwrap();
    assert!(beat < 2000, "heartbeat {beat} ms old on a live worker");
    assert_eq!(d.count_log("SIGABRT"), 0, "{}", d.log_text());

    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(old as i32, libc::SIGSTOP) };
    let line = d.wait_log("heartbeat stopped");
    assert!(
        line.contains(&format!(
            "service echo: worker echo#0 (pid {old}) heartbeat stopped "
        )) && line.ends_with(" ago (timeout 2s); sending SIGABRT"),
        "{line}"
    );
    assert!(seconds_after(&line, "heartbeat stopped ") >= 2.0, "{line}");
    // Stopped, it cannot act on SIGABRT: SIGKILL ends it.
    d.wait_log(&format!("worker echo#0 (pid {old}) killed by signal"));
    assert_ne!(idle_worker(&d, "echo"), old);
    echo_once(addr, b"after\n").unwrap();
}

fn idle_clients_are_cut_busy_ones_are_not() {
    let d = start(
        &(service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 1\nthreads = 4\nidle_timeout = \"1s\"",
        ) + &service(
            "chargen",
            &["tcp://127.0.0.1:0"],
            "chargen",
            "workers = 1\nread_timeout = \"1s\"",
        )),
    );
    d.wait_ready();
    let (echo, chargen) = (d.addr("tcp", "echo"), d.addr("tcp", "chargen"));

    // A client that keeps sending, every 100 ms for 3 s, in a thread.
    let busy = std::thread::spawn(move || -> Result<usize, String> {
        let mut s = connect(echo).map_err(|e| e.to_string())?;
        let end = Instant::now() + Duration::from_secs(3);
        let mut sent = 0;
        while Instant::now() < end {
            s.write_all(b"tick\n").map_err(|e| format!("write: {e}"))?;
            let mut got = [0u8; 5];
            s.read_exact(&mut got)
                .map_err(|e| format!("read after {sent} ticks: {e}"))?;
            sent += got.len();
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(sent)
    });

    // A client that says nothing is cut after about a second.
    let mut silent = connect(echo).unwrap();
    let t = Instant::now();
    assert!(closed(&mut silent), "the silent client was not cut");
    let cut = t.elapsed();
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_secs(10),
        "cut after {cut:?}, idle_timeout 1s"
    );
    // So is one that went silent after a request.
    let mut once = connect(echo).unwrap();
    once.write_all(b"one\n").unwrap();
    let mut got = [0u8; 4];
    once.read_exact(&mut got).unwrap();
    assert!(closed(&mut once));

    // A client that sends nothing while the server keeps writing is busy,
    // not idle: chargen streams past the timeout.
    let mut stream = connect(chargen).unwrap();
    let t = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_millis(2500) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "chargen closed after {:?}", t.elapsed());
        total += n;
    }
    assert!(total > 0);
    drop(stream);

    let sent = busy.join().unwrap().unwrap();
    assert!(sent >= 10 * 5, "only {sent} bytes echoed");
    // Bytes are counted when a connection ends.
    let v = wait_status(&d, "the busy client's bytes", |v| {
        status_workers(v, "echo")
            .iter()
            .map(|w| w["bytes_in"].as_u64().unwrap_or(0))
            .sum::<u64>()
            >= sent as u64
    });
    let w = status_workers(&v, "echo")[0];
    assert!(w["bytes_out"].as_u64().unwrap() >= sent as u64, "{w}");
}

fn main() {
    if std::env::var_os(DAEMON_ENV).is_some_and(|v| v == "1") {
        preforkd::cli::main_with(registry());
    }
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one struct we own; no other thread yet.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let tests: [(&str, fn()); 3] = [
        (
            "hang_is_killed_after_timeout_and_replaced",
            hang_is_killed_after_timeout_and_replaced,
        ),
        (
            "stopped_heartbeat_is_killed_and_replaced",
            stopped_heartbeat_is_killed_and_replaced,
        ),
        (
            "idle_clients_are_cut_busy_ones_are_not",
            idle_clients_are_cut_busy_ones_are_not,
        ),
    ];
    run_tests(&tests);
}
