//! Issue 15's catalogue as tests: rows of the audit that held, each given a
//! test of its own that fails if the behaviour breaks (docs/HARDENING.md
//! lists them). The ones that need strace skip with one line where it is
//! missing or cannot trace.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const CONTROL: &str = "[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// The pids of `service`'s workers in a status document, sorted.
fn worker_pids(v: &serde_json::Value, service: &str) -> Vec<i64> {
    let mut p: Vec<i64> = status_workers(v, service)
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    p.sort();
    p
}

/// Log lines that say a worker exited (clean or not).
fn exit_lines(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| {
            l.contains("worker ")
                && (l.contains(") exited") || l.contains(") killed") || l.contains(") dumped"))
        })
        .map(str::to_string)
        .collect()
}

/// Reads `n` bytes of chargen output, then resets the connection.
fn chargen_then_reset_tcp(addr: std::net::SocketAddr) -> Result<(), String> {
    let mut s = connect(addr).map_err(|e| format!("connect: {e}"))?;
    let mut buf = [0u8; 512];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    // SO_LINGER 0: close(2) sends RST, with the worker mid-write.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("linger: {e}"))?;
    drop(s);
    Ok(())
}

fn chargen_then_close_unix(path: &std::path::Path) -> Result<(), String> {
    let mut s = connect_unix(path).map_err(|e| format!("connect: {e}"))?;
    let mut buf = [0u8; 512];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    // Closed with unread data: the worker's next write fails (EPIPE).
    drop(s);
    Ok(())
}

/// Audit row: a client that resets mid-response (chargen writing without
/// end) costs the worker one connection, not its life: SIGPIPE is ignored
/// and EPIPE/ECONNRESET end that connection only. 50 resets over TCP and
/// 50 closes with unread data over a Unix socket: the same worker, no exit
/// logged, and the next client served each time.
#[test]
fn a_client_reset_mid_response_leaves_the_worker_serving() {
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        service(
            "chargen",
            &["tcp://127.0.0.1:0", "unix:{dir}/cg.sock"],
            "chargen",
            "workers = 1\nthreads = 2",
        )
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "chargen");
    let path = d.path("cg.sock");
    let before = worker_pids(&wait_settled(&d), "chargen");
    assert_eq!(before.len(), 1);
    for i in 0..50 {
        chargen_then_reset_tcp(addr).unwrap_or_else(|e| {
            panic!("tcp client {i}: {e}; log:\n{}", d.log_text());
        });
        chargen_then_close_unix(&path).unwrap_or_else(|e| {
            panic!("unix client {i}: {e}; log:\n{}", d.log_text());
        });
    }
    let after = wait_settled(&d);
    assert_eq!(
        worker_pids(&after, "chargen"),
        before,
        "log:\n{}",
        d.log_text()
    );
    assert!(exit_lines(&d).is_empty(), "log:\n{}", d.log_text());
    assert!(alive(before[0] as i32));
    // The worker's own count: every connection was served (100 and more).
    let served = status_workers(&after, "chargen")[0]["served"]
        .as_u64()
        .unwrap_or(0);
    assert!(served >= 100, "served {served}: {after:#}");
}

/// Audit row: children the master did not fork (the process that exec'ed
/// preforkd had forked them) are reaped when they exit, logged at debug
/// only, and not counted as workers.
#[test]
fn foreign_children_are_reaped_and_not_counted() {
    let dir = tempdir();
    let config = dir.path().join("preforkd.toml");
    let text = format!(
        "{CONTROL}[log]\nlevel = \"debug\"\n\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 2")
    );
    std::fs::write(&config, text.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("sleep 2 & sleep 3 & exec \"$0\" -c \"$1\"")
        .arg(bin())
        .arg(&config);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    let settled_before = wait_settled(&d);
    let workers = worker_pids(&settled_before, "echo");
    assert_eq!(workers.len(), 2);
    let comm = |p: i32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let foreign: Vec<i32> = d
        .workers()
        .into_iter()
        .filter(|p| !workers.contains(&(*p as i64)))
        .collect();
    assert!(
        foreign.iter().all(|p| comm(*p).trim() == "sleep"),
        "children {:?} of which workers {workers:?}",
        d.workers()
    );
    let spawned = d.count_log(") spawned");
    // Both sleeps exit within 3 s of the start: then the master has only
    // its workers as children, none a zombie.
    let left = wait_for(DEADLINE, || {
        let c = d.workers();
        (c.len() == 2 && c.iter().all(|p| alive(*p))).then_some(c)
    });
    assert!(
        left.is_some(),
        "children {:?}, states {:?}; log:\n{}",
        d.workers(),
        d.workers().iter().map(|p| state(*p)).collect::<Vec<_>>(),
        d.log_text()
    );
    for p in &foreign {
        assert!(state(*p).is_none(), "pid {p} left as {:?}", state(*p));
        let lines: Vec<String> = d
            .log_text()
            .lines()
            .filter(|l| l.contains(&format!("pid {p}")))
            .map(str::to_string)
            .collect();
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("DEBUG") || l.contains("DEBUG:")),
            "pid {p} logged above debug: {lines:?}"
        );
    }
    // If the sleeps were seen, their reaping was logged at debug.
    for p in &foreign {
        d.wait_log(&format!("reaped pid {p}, not a worker"));
    }
    assert_eq!(d.count_log(") spawned"), spawned, "log:\n{}", d.log_text());
    assert!(exit_lines(&d).is_empty(), "log:\n{}", d.log_text());
    let after = wait_settled(&d);
    assert_eq!(worker_pids(&after, "echo"), workers);
    echo_once(d.addr("tcp", "echo"), b"still serving\n").unwrap();
    eprintln!("foreign children reaped: {foreign:?}");
}

/// Audit row: every signal preforkd handles, and a few it does not, sent
/// again and again to the whole process group (as a terminal or `kill
/// -HUP -PGID` does) while a client runs echo requests: the master and
/// the workers survive, the only worker exits are the clean ones of
/// reloads and of TTOU, and no request fails.
#[test]
fn a_signal_storm_to_the_process_group_fails_no_request() {
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0"],
            "echo",
            "workers = 2\nthreads = 2"
        )
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    wait_settled(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ok = 0u64;
            let mut failed: std::collections::BTreeMap<String, u64> = Default::default();
            let end = Instant::now() + Duration::from_secs(25);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match echo_once(addr, b"storm\n") {
                    Ok(()) => ok += 1,
                    Err(e) => *failed.entry(e).or_default() += 1,
                }
            }
            (ok, failed)
        })
    };
    let signals = [
        libc::SIGHUP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGUSR1,
        libc::SIGCHLD,
        libc::SIGPIPE,
        libc::SIGWINCH,
        libc::SIGURG,
        libc::SIGCONT,
    ];
    let pgid = d.pid();
    let t0 = Instant::now();
    let mut sent = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        for sig in signals {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(-pgid, sig) };
            sent += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The storm is over: the master settles (reloads done, pool sized).
    let end = wait_settled(&d);
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    eprintln!(
        "signal storm: {sent} signals, {ok} requests, failed {failed:?}, {} worker exits, final size {}",
        exit_lines(&d).len(),
        end["services"][0]["size"]
    );
    assert!(alive(d.pid()), "master died; log:\n{}", d.log_text());
    assert!(ok > 0, "no request served; log:\n{}", d.log_text());
    assert!(
        failed.is_empty(),
        "failed requests {failed:?}; log:\n{}",
        d.log_text()
    );
    let unclean: Vec<String> = exit_lines(&d)
        .into_iter()
        .filter(|l| !l.contains("INFO") || l.contains("signal"))
        .collect();
    assert!(
        unclean.is_empty(),
        "unplanned exits {unclean:?}; log:\n{}",
        d.log_text()
    );
    echo_once(addr, b"after the storm\n").unwrap();
}

/// Kills (and reaps) a helper process on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tracer_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()
}

/// Audit row: fork() failing (EAGAIN) while the daemon serves, not only at
/// boot. strace attaches to the running master and makes every clone fail
/// (glibc's fork() is clone, clone3 in case); a worker is killed: the
/// master logs the failed start with a backoff, keeps serving with the
/// other worker, and refills the pool once strace detaches.
#[test]
fn fork_eagain_while_serving_is_retried_and_the_pool_refilled() {
    let Some(strace) = strace() else {
        eprintln!("skipping: strace is not installed, or cannot trace here");
        return;
    };
    let d = Daemon::start(&format!(
        "{CONTROL}{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 2")
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let workers = worker_pids(&wait_settled(&d), "echo");
    let mut tracer = Killed(
        Command::new(strace)
            .args(["-o", "/dev/null", "-p"])
            .arg(d.pid().to_string())
            .args([
                "-e",
                "trace=clone,clone3,fork,vfork",
                "-e",
                "inject=clone:error=EAGAIN:when=1+",
                "-e",
                "inject=clone3:error=EAGAIN:when=1+",
                "-e",
                "inject=fork:error=EAGAIN:when=1+",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn strace"),
    );
    let strace_pid = tracer.0.id() as i32;
    if wait_for(DEADLINE, || {
        (tracer_pid(d.pid()) == Some(strace_pid)).then_some(())
    })
    .is_none()
    {
        eprintln!("skipping: strace cannot attach to the master (ptrace denied?)");
        return;
    }
    let failures0 = d.count_log("cannot start worker");
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    // Two failed starts: the first and a retry after the backoff.
    wait_for(DEADLINE, || {
        (d.count_log("cannot start worker") >= failures0 + 2).then_some(())
    })
    .unwrap_or_else(|| panic!("no failed starts logged; log:\n{}", d.log_text()));
    let line = d.wait_log("cannot start worker");
    assert!(
        line.contains("retrying in") && line.contains("Resource temporarily unavailable"),
        "{line}"
    );
    // Meanwhile the other worker serves.
    for i in 0..20 {
        echo_once(addr, b"one worker left\n")
            .unwrap_or_else(|e| panic!("request {i}: {e}; log:\n{}", d.log_text()));
    }
    assert!(alive(workers[1] as i32));
    // strace detaches on SIGTERM: the next retry forks.
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(strace_pid, libc::SIGTERM) };
    let _ = wait_for(DEADLINE, || tracer.0.try_wait().ok().flatten());
    let after = wait_settled(&d);
    let now = worker_pids(&after, "echo");
    assert_eq!(now.len(), 2, "{after:#}");
    assert!(now.contains(&workers[1]) && !now.contains(&workers[0]));
    assert!(alive(d.pid()));
    echo_once(addr, b"refilled\n").unwrap();
    eprintln!(
        "fork EAGAIN while serving: {} failed starts logged",
        d.count_log("cannot start worker") - failures0
    );
}

/// Audit row 1 (its file half): a log path that is a symlink (planted by
/// whoever can write the directory) is refused at start, with one line,
/// and the file the link names is not touched.
#[test]
fn a_log_path_that_is_a_symlink_is_refused_at_start() {
    let dir = tempdir();
    let target = dir.path().join("root-owned");
    std::fs::write(&target, "untouched\n").unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("out.log")).unwrap();
    let config = dir.path().join("preforkd.toml");
    let text = format!(
        "[log]\ntarget = \"file\"\nfile = \"{{dir}}/out.log\"\n\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
    );
    std::fs::write(&config, text.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("-c").arg(&config);
    let mut d = Daemon::spawn(cmd, dir, &[]);
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert!(!status.success(), "started through a symlinked log:\n{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "not one line:\n{log}");
    assert!(
        lines[0].contains("out.log") && lines[0].to_lowercase().contains("symbolic link"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched\n");
    assert!(
        std::fs::symlink_metadata(d.path("out.log"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// Audit row 1 (the pid file): symlinks planted at the pid file's path and
/// at the temporary name the master writes it under (`preforkd.tmp.PID`,
/// PID known here because `sh` execs preforkd in its own process) before
/// a restart: the master writes a pid file of its own, and neither target
/// is touched.
#[test]
fn the_pid_file_is_not_written_through_planted_symlinks() {
    let dir = tempdir();
    let p = dir.path();
    for name in ["target-pid", "target-tmp"] {
        std::fs::write(p.join(name), "untouched\n").unwrap();
    }
    std::os::unix::fs::symlink(p.join("target-pid"), p.join("preforkd.pid")).unwrap();
    let config = p.join("preforkd.toml");
    let text = format!(
        "[daemon]\npid_file = \"{{dir}}/preforkd.pid\"\n\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
    );
    std::fs::write(&config, text.replace("{dir}", p.to_str().unwrap())).unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ln -s \"$2\" \"$3.tmp.$$\" && exec \"$0\" -c \"$1\"")
        .arg(bin())
        .arg(&config)
        .arg(p.join("target-tmp"))
        .arg(p.join("preforkd"));
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    let pid_file = d.path("preforkd.pid");
    let meta = std::fs::symlink_metadata(&pid_file).unwrap();
    assert!(meta.file_type().is_file(), "pid file is {meta:?}");
    assert_eq!(pid_file_pid(&pid_file), Some(d.pid()));
    for name in ["target-pid", "target-tmp"] {
        assert_eq!(
            std::fs::read_to_string(d.path(name)).unwrap(),
            "untouched\n",
            "{name} written through; log:\n{}",
            d.log_text()
        );
    }
    let tmp = d.path(&format!("preforkd.tmp.{}", d.pid()));
    assert!(
        std::fs::symlink_metadata(&tmp).is_err(),
        "{} left behind",
        tmp.display()
    );
    echo_once(d.addr("tcp", "echo"), b"served\n").unwrap();
}
