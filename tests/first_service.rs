//! The README's "Your first service", as a new user runs it: the TOML block
//! under that heading is `config/examples/first.toml`, byte for byte, and
//! that config runs as written, with relative paths, from a directory of
//! its own: `preforkd -c first.toml`, then `status`, `reload` and `stop`
//! from the same directory, each with the exit code and output the README
//! says.
//!
//! One change to the config: its TCP port. The README names a port
//! (127.0.0.1:8020) for the reader to type; tests run in parallel, on a
//! shared machine, so a fixed port may be taken by another test or by
//! anyone else. The test writes port 0 instead, so that the daemon's own
//! bind reserves a free port on 127.0.0.1 (the kernel picks it; the log
//! says which). That is race-free, where reserving a port in the test and
//! releasing it for the daemon would leave a moment for someone else to
//! take it. Everything else runs as written, and needs no root.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const README: &str = include_str!("../README.md");
const FIRST: &str = include_str!("../config/examples/first.toml");
/// The address the README's config names; replaced by port 0 here.
const README_ADDR: &str = "tcp://127.0.0.1:8020";

/// The first ```toml block after the `## Your first service` heading and
/// before the next `## ` heading.
fn readme_config() -> String {
    let start = README
        .find("\n## Your first service\n")
        .expect("README.md has a \"## Your first service\" heading");
    let section = &README[start + 1..];
    let section = match section[3..].find("\n## ") {
        Some(end) => &section[..end + 3],
        None => section,
    };
    let open = section
        .find("```toml\n")
        .expect("a ```toml block under \"Your first service\"");
    let body = &section[open + "```toml\n".len()..];
    let close = body.find("\n```").expect("the ```toml block is closed");
    format!("{}\n", &body[..close])
}

/// `preforkd ARGS` run in `dir`, as a user in a second terminal would:
/// killed (and the test failed) if it is still running after DEADLINE.
fn preforkd_in(dir: &Path, args: &[&str]) -> Output {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    let mut child = spawn_retrying(&mut cmd);
    let status = wait_for(DEADLINE, || child.try_wait().unwrap()).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`preforkd {}` still running after {DEADLINE:?}",
            args.join(" ")
        )
    });
    let text = |mut f: std::fs::File| {
        use std::io::Seek;
        let mut s = String::new();
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        s.into_bytes()
    };
    Output {
        status,
        stdout: text(out),
        stderr: text(err),
    }
}

#[test]
fn readme_block_is_the_shipped_config() {
    assert_eq!(
        readme_config(),
        FIRST,
        "the TOML block under \"Your first service\" in README.md must be config/examples/first.toml"
    );
    assert!(
        FIRST.contains(README_ADDR),
        "config/examples/first.toml no longer listens on {README_ADDR}: update this test"
    );
}

#[test]
fn first_service_runs_as_written() {
    let config = readme_config().replace(README_ADDR, "tcp://127.0.0.1:0");
    assert_ne!(config, readme_config(), "the port was not replaced");
    let dir = tempdir();
    std::fs::write(dir.path().join("first.toml"), &config).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["-c", "first.toml"]);
    // The current directory of the daemon is the temp dir (Daemon::spawn).
    let mut d = Daemon::spawn(cmd, dir, &[]);
    let dir = d.dir.path().to_path_buf();

    // It answers: `status` succeeds once the control socket is up and the
    // first generation is ready.
    let status = wait_for(DEADLINE, || {
        let out = preforkd_in(&dir, &["-c", "first.toml", "status"]);
        (out.status.success() && stdout(&out).contains("2 idle")).then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "`status` never showed 2 idle workers; log:\n{}",
            d.log_text()
        )
    });
    let text = stdout(&status);
    assert!(text.contains("generation 1"), "{}", show(&status));
    assert!(
        text.contains("service echo (plugin echo, 2 workers)"),
        "{}",
        show(&status)
    );
    assert!(text.contains("unix:echo.sock"), "{}", show(&status));
    assert!(
        dir.join("preforkd.ctl").exists(),
        "the control socket is relative to the directory"
    );

    // The two `nc` lines: echo on TCP and on the Unix socket.
    echo_once(d.addr("tcp", "echo"), b"hello\n").expect("echo over TCP");
    let mut s = connect_unix(&dir.join("echo.sock")).expect("connect to echo.sock");
    s.write_all(b"unix\n").unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"unix\n");
    drop(s);

    let reload = preforkd_in(&dir, &["-c", "first.toml", "reload"]);
    assert_eq!(reload.status.code(), Some(0), "{}", show(&reload));
    assert!(
        stdout(&reload).starts_with("reloaded: generation 2 serving"),
        "{}",
        show(&reload)
    );

    let stop = preforkd_in(&dir, &["-c", "first.toml", "stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", show(&stop));
    assert_eq!(
        stdout(&stop).trim_end(),
        format!("stopped: master pid {} has exited", d.pid()),
        "{}",
        show(&stop)
    );
    let exit = d.wait_exit(Duration::from_secs(5));
    assert_eq!(exit.code(), Some(0), "log:\n{}", d.log_text());
    for file in ["echo.sock", "preforkd.ctl"] {
        assert!(!dir.join(file).exists(), "{file} left behind");
    }
}
