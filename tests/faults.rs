//! Fault injection with strace: system calls the master depends on fail, and
//! the daemon degrades instead of dying. Skipped (with a message) where
//! strace is not installed; `.ci/run` installs it.

mod common;

use std::process::Command;

use common::*;

/// strace, if it is installed and may trace here (ptrace can be forbidden
/// in a restricted container).
fn strace() -> Option<std::path::PathBuf> {
    let out = Command::new("which").arg("strace").output().ok()?;
    let path: std::path::PathBuf = String::from_utf8_lossy(&out.stdout).trim().into();
    let works = Command::new(&path)
        .args(["-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success());
    (out.status.success() && works).then_some(path)
}

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
