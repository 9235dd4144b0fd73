//! The library API and the master's handling of failing workers, with plugins
//! that only this test registers.
//!
//! This file has its own `main` (`harness = false` in Cargo.toml). With
//! `PREFORKD_TEST_DAEMON=1` in its environment the test binary *is* a preforkd
//! daemon: the built-in plugins plus the test plugins below, through
//! `preforkd::cli::main_with`. That branch runs first thing in `main`, before
//! any thread exists, because the master must be single-threaded to fork.
//! Otherwise `main` runs the tests one after another; each starts this same
//! binary as its daemon.
//!
//! - `failboot`: its factory always fails: the master exits 78 at start.
//! - `flaky`: echo whose factory fails while the file named by its `flag`
//!   option exists: crash-loop backoff, then recovery.
//! - `panicky`: echo that panics on a line starting with `panic`: one
//!   connection lost, the worker lives on.
//! - `stubborn`: echo over blocking `Read`, deaf to the shutdown flag: the
//!   master SIGKILLs it after `graceful_timeout`.
//! - `environ`: writes the names of the worker's environment variables, one
//!   a line: systemd's variables (NOTIFY_SOCKET, LISTEN_FDS, ...) never
//!   reach a worker.

mod common;

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use preforkd::handler::{Connection, Handlers, PluginInfo, Recv, Registry, StreamHandler};

/// The environment variable that turns this binary into a daemon.
const DAEMON_ENV: &str = "PREFORKD_TEST_DAEMON";

// ---------------------------------------------------------------------------
// The test plugins.

/// Echo through the request-boundary API: `recv` (stops at shutdown) and
/// `write_all`. Panics on input that starts with `panic` when `panicky`.
struct Echo {
    panicky: bool,
}

impl StreamHandler for Echo {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match conn.recv(&mut buf)? {
                Recv::Data(n) => {
                    if self.panicky && buf[..n].starts_with(b"panic") {
                        panic!("the client asked for a panic (test)");
                    }
                    conn.write_all(&buf[..n])?;
                }
                Recv::Eof | Recv::Shutdown => return Ok(()),
            }
        }
    }
}

/// Echo over the blocking `Read` impl, which does not return when the
/// worker is asked to stop: a handler that never finishes on its own.
struct Stubborn;

impl StreamHandler for Stubborn {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n])?;
        }
    }
}

/// Writes the names of the worker's environment variables, then closes.
struct Environ;

impl StreamHandler for Environ {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let names: String = std::env::vars_os()
            .map(|(k, _)| format!("{}\n", k.to_string_lossy()))
            .collect();
        conn.write_all(names.as_bytes())
    }
}

/// The built-in plugins and the four test plugins.
fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register(PluginInfo::new("failboot", "test plugin", |_ctx| {
        Err("database unreachable (test)".into())
    }));
    r.register(PluginInfo::new("flaky", "test plugin", |ctx| {
        ctx.expect_options("flaky", &["flag"])?;
        let flag = ctx
            .options
            .get("flag")
            .and_then(|v| v.as_str())
            .ok_or("plugin \"flaky\" needs the option flag = \"PATH\"")?;
        if Path::new(flag).exists() {
            return Err(format!("flag file {flag} exists (test)"));
        }
        Ok(Handlers::stream(Echo { panicky: false }))
    }));
    r.register(PluginInfo::new("panicky", "test plugin", |_ctx| {
        Ok(Handlers::stream(Echo { panicky: true }))
    }));
    r.register(PluginInfo::new("stubborn", "test plugin", |_ctx| {
        Ok(Handlers::stream(Stubborn))
    }));
    r.register(PluginInfo::new("environ", "test plugin", |_ctx| {
        Ok(Handlers::stream(Environ))
    }));
    r
}

// ---------------------------------------------------------------------------
// The tests.

/// Starts this binary as a daemon with the test plugins.
fn start(config: &str) -> Daemon {
    let exe = std::env::current_exe().expect("current_exe");
    Daemon::start_bin(&exe, config, &[(DAEMON_ENV, "1")])
}

/// The pids in the `worker NAME (pid N) spawned` lines of `log`.
fn spawned_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter(|l| l.ends_with(" spawned"))
        .filter_map(|l| {
            let start = l.find("(pid ")? + 5;
            let end = start + l[start..].find(')')?;
            l[start..end].parse().ok()
        })
        .collect()
}

/// A worker whose handler cannot initialise, in the first generation: the
/// master reports the reason and exits 78 instead of crash-looping.
fn failboot_exits_78_without_a_crash_loop() {
    let mut d = start(&service(
        "boot",
        &["tcp://127.0.0.1:0"],
        "failboot",
        "workers = 2",
    ));
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert_eq!(
        status.code(),
        Some(preforkd::exit::code::CONFIG),
        "exit status {status:?}; log:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("failed to boot") && l.contains("database unreachable (test)")),
        "the reason is not logged:\n{log}"
    );
    let spawned = spawned_pids(&log);
    assert!(
        (1..=2).contains(&spawned.len()),
        "{} workers spawned for a pool of 2:\n{log}",
        spawned.len()
    );
    // The master waited for its workers before it exited.
    for pid in spawned {
        assert!(
            wait_for(DEADLINE, || (!alive(pid)).then_some(())).is_some(),
            "worker {pid} outlived the master"
        );
    }
}

/// Workers that fail to start after the first generation: their slots back
/// off exponentially (no fork storm), the master stays up, and the pool
/// recovers once starting works again.
fn flaky_backs_off_then_recovers() {
    let config = service("flaky", &["tcp://127.0.0.1:0"], "flaky", "workers = 2")
        + "[service.handler.options]\nflag = \"{dir}/flag\"\n";
    let mut d = start(&config);
    d.wait_ready();
    let addr = d.addr("tcp", "flaky");
    echo_once(addr, b"before\n").unwrap();
    let workers = d.wait_workers(2);

    std::fs::write(d.path("flag"), "").unwrap();
    let before = d.count_log(" spawned");
    let ready_before = d.count_log(") ready");
    for pid in &workers {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    // Time must pass here: the backoff is what is observed.
    std::thread::sleep(Duration::from_secs(3));
    let log = d.log_text();
    let respawned = d.count_log(" spawned") - before;
    // 0.1 s doubling: about 5 starts per slot in 3 s; a storm is thousands.
    assert!(
        (2..=16).contains(&respawned),
        "{respawned} workers spawned in 3 s with a failing plugin:\n{log}"
    );
    assert!(log.contains("failed to start"), "no backoff logged:\n{log}");
    assert!(
        log.contains("exists (test)"),
        "the plugin's reason is not logged:\n{log}"
    );
    assert_eq!(
        d.child.try_wait().unwrap(),
        None,
        "the master exited:\n{log}"
    );
    assert!(alive(d.pid()));

    std::fs::remove_file(d.path("flag")).unwrap();
    // Two new workers report ready: one per slot (a ready worker stays).
    // The backoff may have reached a few seconds: a long deadline.
    let deadline = DEADLINE * 2;
    wait_for(deadline, || {
        (d.count_log(") ready") >= ready_before + 2).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the pool did not recover within {deadline:?}; log:\n{}",
            d.log_text()
        )
    });
    let now = d.wait_workers(2);
    assert!(
        now.iter().all(|p| !workers.contains(p)),
        "{now:?} {workers:?}"
    );
    echo_once(addr, b"after\n").unwrap();
    assert_eq!(d.child.try_wait().unwrap(), None, "the master exited");
}

/// A handler that panics loses its connection, not its worker.
fn panicky_closes_only_its_connection() {
    let d = start(&service(
        "panicky",
        &["tcp://127.0.0.1:0"],
        "panicky",
        "workers = 1",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "panicky");
    echo_once(addr, b"hello\n").unwrap();
    let worker = d.wait_workers(1);

    let mut s = connect(addr).unwrap();
    s.write_all(b"panic please\n").unwrap();
    match read_to_eof(&mut s) {
        Ok(got) => assert!(got.is_empty(), "got {got:?} instead of EOF"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "the panicking connection was not closed: {e}"
        ),
    }
    d.wait_log("handler panicked");

    echo_once(addr, b"still here\n").unwrap();
    assert_eq!(d.workers(), worker, "the worker was replaced");
    assert!(alive(worker[0]));
    assert_eq!(d.count_log(" spawned"), 1, "log:\n{}", d.log_text());
}

/// A handler deaf to shutdown: SIGTERM waits `graceful_timeout`, then the
/// master kills the worker and exits 0.
fn stubborn_is_killed_after_graceful_timeout() {
    let mut d = start(&service(
        "stubborn",
        &["tcp://127.0.0.1:0"],
        "stubborn",
        "workers = 1\ngraceful_timeout = \"1s\"",
    ));
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "stubborn")).unwrap();
    s.write_all(b"hold on\n").unwrap();
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hold on\n");

    let sent = Instant::now();
    d.signal(libc::SIGTERM);
    d.wait_log("sending SIGKILL");
    let waited = sent.elapsed();
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(
        waited >= Duration::from_millis(950),
        "killed {waited:?} after SIGTERM, before graceful_timeout (1s):\n{log}"
    );
    assert!(log.contains("killed by signal SIGKILL"), "log:\n{log}");
    // The killed worker's connection is closed, not left hanging.
    if let Err(e) = read_to_eof(&mut s) {
        assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "the connection outlived its worker: {e}"
        );
    }
}

/// NOTIFY_SOCKET and the watchdog variables are for the master: a worker
/// (and whatever it runs) never sees them, though it sees the rest of the
/// environment.
fn workers_do_not_inherit_notify_socket() {
    let dir = tempdir();
    let socket = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    let exe = std::env::current_exe().expect("current_exe");
    let d = Daemon::start_bin(
        &exe,
        &service("env", &["tcp://127.0.0.1:0"], "environ", "workers = 1"),
        &[
            (DAEMON_ENV, "1"),
            ("NOTIFY_SOCKET", socket.to_str().unwrap()),
            ("WATCHDOG_USEC", "30000000"),
        ],
    );
    // READY=1 on the socket: the master did read it.
    notify
        .set_read_timeout(Some(DEADLINE))
        .expect("set_read_timeout");
    let mut buf = [0u8; 4096];
    loop {
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no READY=1 ({e}); log:\n{}", d.log_text()));
        if buf[..n].starts_with(b"READY=1\n") {
            break;
        }
    }
    let mut s = connect(d.addr("tcp", "env")).unwrap();
    let names = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    let names: Vec<&str> = names.lines().collect();
    assert!(names.contains(&DAEMON_ENV), "{names:?}");
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        assert!(!names.contains(&var), "a worker sees {var}: {names:?}");
    }
}

/// LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES (socket activation) are for
/// the master too. Skipped without systemd-socket-activate.
fn workers_do_not_inherit_listen_fds() {
    let tool = "systemd-socket-activate";
    if !std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: {tool} is not installed (the systemd package)");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempdir();
    let config = dir.path().join("preforkd.toml");
    std::fs::write(
        &config,
        service("env", &["systemd:env"], "environ", "workers = 1"),
    )
    .unwrap();
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = std::process::Command::new(tool);
    cmd.arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fdname=env")
        .arg(format!("-E{DAEMON_ENV}=1"))
        .arg("--")
        .arg(exe)
        .arg("-c")
        .arg(&config);
    let d = Daemon::spawn(cmd, dir, &[]);
    wait_for(DEADLINE, || {
        (d.count_log("Listening on ") > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("the activator is not listening; log:\n{}", d.log_text()));
    // The connection wakes the activator, which execs the daemon.
    let mut s = connect(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    let names = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    let names: Vec<&str> = names.lines().collect();
    assert!(
        names.contains(&DAEMON_ENV),
        "{names:?}; log:\n{}",
        d.log_text()
    );
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        assert!(!names.contains(&var), "a worker sees {var}: {names:?}");
    }
    assert!(
        d.log_text().contains("adopted tcp://127.0.0.1:"),
        "{}",
        d.log_text()
    );
}

// ---------------------------------------------------------------------------
// The runner.

fn main() {
    if std::env::var_os(DAEMON_ENV).is_some_and(|v| v == "1") {
        preforkd::cli::main_with(registry());
    }
    let tests: [(&str, fn()); 6] = [
        (
            "failboot_exits_78_without_a_crash_loop",
            failboot_exits_78_without_a_crash_loop,
        ),
        (
            "flaky_backs_off_then_recovers",
            flaky_backs_off_then_recovers,
        ),
        (
            "panicky_closes_only_its_connection",
            panicky_closes_only_its_connection,
        ),
        (
            "stubborn_is_killed_after_graceful_timeout",
            stubborn_is_killed_after_graceful_timeout,
        ),
        (
            "workers_do_not_inherit_notify_socket",
            workers_do_not_inherit_notify_socket,
        ),
        (
            "workers_do_not_inherit_listen_fds",
            workers_do_not_inherit_listen_fds,
        ),
    ];
    run_tests(&tests);
}
