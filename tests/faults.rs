//! Fault injection with strace: system calls the master depends on fail, and
//! the daemon degrades instead of dying. Skipped (with a message) where
//! strace is not installed; `.ci/run` installs it.

mod common;

use std::process::Command;

use common::*;

/// fork() fails (EAGAIN, as at a process limit) for the 2nd to 4th worker
/// the master starts: the master logs each failure, retries that slot with
/// backoff, and the pool still comes up complete and serves.
#[test]
fn fork_failures_are_retried_with_backoff() {
    let Some(strace) = strace() else {
        eprintln!("skipping: strace is not installed, or cannot trace here");
        return;
    };
    let dir = tempdir();
    let config = dir.path().join("preforkd.toml");
    std::fs::write(
        &config,
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 3"),
    )
    .unwrap();
    let mut cmd = Command::new(strace);
    // Only the master is traced (no -f); glibc's fork() is the clone syscall.
    cmd.args(["-o", "/dev/null", "-e", "trace=clone", "-e"])
        .arg("inject=clone:error=EAGAIN:when=2..4")
        .arg(bin())
        .arg("-c")
        .arg(&config);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    let failures = d.count_log("cannot start worker");
    assert_eq!(failures, 3, "log:\n{}", d.log_text());
    assert!(
        d.log_text()
            .contains("fork() failed: Resource temporarily unavailable"),
        "log:\n{}",
        d.log_text()
    );
    // The traced process is strace; the master is its only child.
    let master = wait_for(DEADLINE, || children(d.pid()).first().copied()).unwrap();
    let workers = wait_for(DEADLINE, || {
        let w = children(master);
        (w.len() == 3).then_some(w)
    });
    assert!(workers.is_some(), "log:\n{}", d.log_text());
    echo_once(d.addr("tcp", "echo"), b"still serving\n").unwrap();
}

/// Sets `pid`'s soft RLIMIT_NOFILE (the hard one kept); returns the old
/// soft one.
fn set_nofile(pid: i32, soft: u64) -> u64 {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid rlimit64 for the call to fill; no new limit.
    let rc = unsafe { libc::prlimit64(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
    let lim = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `lim` is a valid rlimit64 read by the call; the old limit is
    // not asked for (null).
    let rc = unsafe { libc::prlimit64(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// The lowest descriptor number `pid` has free: a limit there makes its
/// next accept() fail with EMFILE.
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// user + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Audit row: out of descriptors (EMFILE in accept), each idle thread
/// logged a warning every 100 ms (220 lines a second). Now: one line a
/// second per worker, with a count of the failures it stands for; no busy
/// loop; and the clients waiting are served once descriptors are back.
#[test]
fn emfile_in_accept_is_logged_once_a_second_and_recovers() {
    let d = Daemon::start(&service(
        "echo",
        &["tcp://127.0.0.1:0"],
        "echo",
        "workers = 1\nthreads = 4",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    echo_once(addr, b"before\n").unwrap();
    let worker = d.wait_workers(1)[0];
    let limit = lowest_free_fd(worker);
    let before = set_nofile(worker, limit);
    // Clients wait in the listen queue: every accept fails meanwhile.
    let waiting: Vec<_> = (0..3).map(|_| connect(addr).unwrap()).collect();
    d.wait_log("accept() failed: Too many open files");
    let (lines0, cpu0, t0) = (
        d.count_log("accept() failed"),
        cpu_ticks(worker),
        std::time::Instant::now(),
    );
    // A measuring window, not a synchronisation.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let secs = t0.elapsed().as_secs_f64();
    let lines = d.count_log("accept() failed") - lines0;
    let cpu = cpu_ticks(worker) - cpu0;
    eprintln!("EMFILE: {lines} log lines in {secs:.1} s, {cpu} CPU ticks");
    assert!(
        (lines as f64) <= secs + 2.0,
        "{lines} lines in {secs:.1} s; log:\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("more since the last report"),
        "no count in the lines; log:\n{}",
        d.log_text()
    );
    // 100 ticks a second: a busy loop would take about 3 s of CPU.
    assert!(cpu < 50, "{cpu} ticks of CPU in {secs:.1} s: a busy loop");
    // Descriptors back: the waiting clients are served.
    set_nofile(worker, before);
    for mut s in waiting {
        use std::io::{Read, Write};
        s.write_all(b"after\n").unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after\n");
    }
    echo_once(addr, b"later\n").unwrap();
}
