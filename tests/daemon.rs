//! `--daemon`: the launcher's exit code reflects the daemon's start (bad
//! port 69, bad config 78); a stale pid file is taken over whatever pid it
//! names; a second instance on a locked pid file is refused (73).
//! Daemons leave the test's process group (setsid): a guard kills theirs
//! through the pid file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Kills the daemon named by the pid file (its whole process group) on drop.
struct Guard {
    pid_file: PathBuf,
    pgid: Option<i32>,
}

impl Guard {
    fn new(pid_file: &Path) -> Guard {
        Guard {
            pid_file: pid_file.to_owned(),
            pgid: None,
        }
    }

    /// Notes the daemon's process group while it is alive.
    fn track(&mut self) -> i32 {
        let pid = pid_file_pid(&self.pid_file).expect("a pid in the pid file");
        // SAFETY: getpgid(2) has no memory effects.
        let pgid = unsafe { libc::getpgid(pid) };
        assert!(pgid > 0, "daemon {pid} is not running");
        self.pgid = Some(pgid);
        pid
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let pgid = self.pgid.or_else(|| {
            let pid = pid_file_pid(&self.pid_file)?;
            // SAFETY: getpgid(2) has no memory effects.
            let pgid = unsafe { libc::getpgid(pid) };
            (pgid > 0).then_some(pgid)
        });
        if let Some(pgid) = pgid {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

fn config(dir: &Path, port: u16) -> String {
    format!(
        "[daemon]\npid_file = \"{d}/preforkd.pid\"\n[log]\ntarget = \"file\"\nfile = \"{d}/preforkd.log\"\n{}",
        service(
            "echo",
            &[&format!("tcp://127.0.0.1:{port}")],
            "echo",
            "workers = 2"
        ),
        d = dir.display()
    )
}

/// Runs `preforkd --daemon -c CONFIG` and waits (bounded) for the launcher.
fn launch(config: &Path) -> Output {
    let child = Command::new(bin())
        .arg("--daemon")
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) has no memory effects; not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the launcher did not exit within 60 s")
        }
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("preforkd.log")).unwrap_or_default()
}

#[test]
fn the_launcher_waits_for_ready_and_a_second_instance_is_refused() {
    let dir = tempdir();
    let pid_file = dir.path().join("preforkd.pid");
    let mut guard = Guard::new(&pid_file);
    let path = dir.path().join("preforkd.toml");
    let port = free_port();
    std::fs::write(&path, config(dir.path(), port)).unwrap();
    // A stale pid file: it names a live process (this test), but nobody
    // holds its lock, so it is taken over.
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();

    let out = launch(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nlog:\n{}",
        show(&out),
        log_of(dir.path())
    );
    let pid = guard.track();
    assert_ne!(
        pid,
        std::process::id() as i32,
        "the stale pid file was not taken over"
    );
    // Ready when the launcher exited: the workers are there, echo answers.
    assert!(log_of(dir.path()).contains("INFO: ready: echo (2 workers)"));
    assert_eq!(children(pid).len(), 2);
    echo_once(format!("127.0.0.1:{port}").parse().unwrap(), b"daemon\n").unwrap();
    // Detached: its own session, not our process group.
    // SAFETY: getsid(2) and getpgid(2) have no memory effects.
    let (sid, our_sid, pgid, our_pgid) = unsafe {
        (
            libc::getsid(pid),
            libc::getsid(0),
            libc::getpgid(pid),
            libc::getpgid(0),
        )
    };
    assert_ne!(sid, our_sid);
    assert_ne!(pgid, our_pgid);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        PathBuf::from("/")
    );

    // A second instance on the same pid file is refused, and says why.
    let out = launch(&path);
    assert_eq!(out.status.code(), Some(73), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: pid file is locked: another preforkd (pid {pid}) runs on it",
            pid_file.display()
        )),
        "{}",
        show(&out)
    );
    assert_eq!(pid_file_pid(&pid_file), Some(pid));
    assert!(alive(pid));
}

#[test]
fn the_launcher_exits_69_when_the_port_is_taken() {
    let dir = tempdir();
    let pid_file = dir.path().join("preforkd.pid");
    let _guard = Guard::new(&pid_file);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config(dir.path(), port)).unwrap();
    let out = launch(&path);
    assert_eq!(out.status.code(), Some(69), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "preforkd: the daemon failed to start: cannot listen on tcp://127.0.0.1:{port}: bind() failed"
        )),
        "{}",
        show(&out)
    );
    assert!(!pid_file.exists(), "a failed daemon left its pid file");
}

#[test]
fn the_launcher_exits_78_on_a_bad_config() {
    let dir = tempdir();
    let pid_file = dir.path().join("preforkd.pid");
    let _guard = Guard::new(&pid_file);
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config(dir.path(), 0) + "workers = 0\n").unwrap();
    let out = launch(&path);
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("{}:", path.display())),
        "{}",
        show(&out)
    );
    assert!(!pid_file.exists());
}

/// After a binary upgrade the pid file is a new file, written by the new
/// master: it locks it too, so a second instance is still refused.
#[test]
fn the_pid_file_stays_locked_across_an_upgrade() {
    let dir = tempdir();
    let pid_file = dir.path().join("preforkd.pid");
    let mut guard = Guard::new(&pid_file);
    let path = dir.path().join("preforkd.toml");
    let port = free_port();
    std::fs::write(
        &path,
        format!(
            "{}\n[control]\nsocket = \"{}/control.sock\"\n",
            config(dir.path(), port),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = launch(&path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nlog:\n{}",
        show(&out),
        log_of(dir.path())
    );
    let old = guard.track();
    let out = run_cli(&path, &["upgrade"]);
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        show(&out),
        log_of(dir.path())
    );
    let new = pid_file_pid(&pid_file).expect("a pid file");
    assert_ne!(new, old);
    let out = launch(&path);
    assert_eq!(
        out.status.code(),
        Some(73),
        "{}\nlog:\n{}",
        show(&out),
        log_of(dir.path())
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("another preforkd (pid {new})")),
        "{}",
        show(&out)
    );
    echo_once(format!("127.0.0.1:{port}").parse().unwrap(), b"after\n").unwrap();
}
