//! What a person reads when something is wrong: config errors in the
//! config's words (no Rust type names, no doubled prefixes, hints for the
//! common slips, long values cut, invalid UTF-8 located), `check` finding
//! what the run would fail on, the file-descriptor limit, a closed stdout,
//! plurals, and the config path in one form. Each message is asserted
//! whole.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// `preforkd check` on `text` written to DIR/NAME: (exit code, stderr).
fn check_text(dir: &Path, name: &str, text: &[u8]) -> (Option<i32>, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = run_cli(&path, &["check"]);
    (out.status.code(), stderr(&out))
}

const TAIL: &str = "listen = [\"tcp://127.0.0.1:0\"]\n[service.handler]\nplugin = \"echo\"\n";

#[test]
fn the_common_slips_get_a_hint() {
    let dir = tempdir();
    let d = dir.path();
    let (code, err) = check_text(
        d,
        "a.toml",
        format!("[service]\nname = \"a\"\n{TAIL}").as_bytes(),
    );
    assert_eq!(code, Some(78));
    assert_eq!(
        err,
        format!(
            "preforkd: {}/a.toml:1:1: [service] is one table, but services are a list: write [[service]] (two brackets) before each service\n",
            d.display()
        )
    );
    let (code, err) = check_text(
        d,
        "b.toml",
        b"[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:0\"]\nhandler = \"daytime\"\n",
    );
    assert_eq!(code, Some(78));
    assert_eq!(
        err,
        format!(
            "preforkd: {}/b.toml:4:11: handler is a table, not a string: write [service.handler] on a line of its own, then plugin = \"daytime\" under it\n",
            d.display()
        )
    );
    // A type error says what was expected in TOML's words.
    let (_, err) = check_text(
        d,
        "c.toml",
        format!("[[service]]\nname = \"a\"\nthreads = \"x\"\n{TAIL}").as_bytes(),
    );
    assert_eq!(
        err,
        format!(
            "preforkd: {}/c.toml:3:11: invalid type: string \"x\", expected a whole number\n",
            d.display()
        )
    );
}

#[test]
fn a_plugin_check_names_the_service_and_plugin_once() {
    let dir = tempdir();
    let (code, err) = check_text(
        dir.path(),
        "e.toml",
        b"[[service]]\nname = \"d\"\nlisten = [\"tcp://127.0.0.1:0\"]\n[service.handler]\nplugin = \"exec\"\n",
    );
    assert_eq!(code, Some(78));
    assert_eq!(
        err,
        format!(
            "preforkd: {}/e.toml:5:10: service \"d\": plugin \"exec\" needs option \"command\", e.g. command = [\"/bin/cat\"]\n",
            dir.path().display()
        )
    );
}

#[test]
fn long_values_are_cut_and_bad_bytes_located() {
    let dir = tempdir();
    let long = "x".repeat(1 << 20);
    let (code, err) = check_text(
        dir.path(),
        "long.toml",
        format!("[[service]]\nname = \"a\"\nlisten = [\"tcp://{long}\"]\n[service.handler]\nplugin = \"echo\"\n").as_bytes(),
    );
    assert_eq!(code, Some(78));
    assert!(
        err.len() < 600,
        "{} bytes: {}",
        err.len(),
        &err[..600.min(err.len())]
    );
    assert!(
        err.contains("long.toml:3:11: invalid listen address \"tcp://xxxx")
            && err.contains("xxxx\" (1048582 characters): expected tcp://"),
        "{err}"
    );
    let (code, err) = check_text(dir.path(), "utf8.toml", b"[[service]]\nname = \"a\xff\"\n");
    assert_eq!(code, Some(78));
    assert_eq!(
        err,
        format!(
            "preforkd: {}/utf8.toml:2:10: invalid UTF-8: a config file is UTF-8 text; re-save it as UTF-8\n",
            dir.path().display()
        )
    );
}

#[test]
fn check_finds_missing_directories_and_unopenable_log_files() {
    let dir = tempdir();
    let d = dir.path();
    let (code, err) = check_text(
        d,
        "sock.toml",
        format!("[[service]]\nname = \"a\"\nlisten = [\"unix:{}/nope/a.sock\"]\n[service.handler]\nplugin = \"echo\"\n", d.display()).as_bytes(),
    );
    assert_eq!(code, Some(78));
    assert_eq!(
        err,
        format!(
            "preforkd: {0}/sock.toml:3:11: unix:{0}/nope/a.sock: directory {0}/nope does not exist: create it (under systemd, RuntimeDirectory= makes one in /run)\n",
            d.display()
        )
    );
    let (code, err) = check_text(
        d,
        "ctl.toml",
        format!(
            "[control]\nsocket = \"{}/nope/ctl.sock\"\n[[service]]\nname = \"a\"\n{TAIL}",
            d.display()
        )
        .as_bytes(),
    );
    assert_eq!(code, Some(78));
    assert!(
        err.contains("ctl.toml:2:10: control socket: directory"),
        "{err}"
    );
    let (code, err) = check_text(
        d,
        "log.toml",
        format!(
            "[log]\ntarget = \"file\"\nfile = \"{}/logs/x.log\"\n[[service]]\nname = \"a\"\n{TAIL}",
            d.display()
        )
        .as_bytes(),
    );
    assert_eq!(code, Some(78));
    assert_eq!(
        err,
        format!(
            "preforkd: {0}/log.toml:3:8: log file {0}/logs/x.log: directory {0}/logs does not exist: create it (under systemd, LogsDirectory= makes one in /var/log)\n",
            d.display()
        )
    );
    // Once the directory is there, the same config is valid, and check
    // created nothing.
    std::fs::create_dir(d.join("logs")).unwrap();
    let out = run_cli(&d.join("log.toml"), &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(!d.join("logs/x.log").exists(), "check created the log file");
}

#[test]
fn threads_that_cannot_fit_the_descriptor_limit_are_a_config_error() {
    let dir = tempdir();
    let path = dir.path().join("fd.toml");
    std::fs::write(
        &path,
        format!("[[service]]\nname = \"a\"\nthreads = 200\n{TAIL}"),
    )
    .unwrap();
    // The hard limit, to which the master raises the soft one for its
    // workers, lowered for this run only (`ulimit -n` sets both).
    let script = format!(
        "ulimit -n 128 && exec {} -c {} check",
        bin().display(),
        path.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "preforkd: {}:3:11: service \"a\": threads = 200 needs about 265 file descriptors in each worker, more than the open files limit of 128 (the hard limit: ulimit -Hn; LimitNOFILE= under systemd): lower threads or raise the limit\n",
            path.display()
        )
    );
    // The same when the master starts: nothing is bound, nothing forked.
    let script = format!(
        "ulimit -n 128 && exec {} -c {} run",
        bin().display(),
        path.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(
        stderr(&out).contains("threads = 200 needs about 265"),
        "{}",
        show(&out)
    );
}

#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let dir = tempdir();
    let path = dir.path().join("ok.toml");
    let services: String = (0..50)
        .map(|i| format!("[[service]]\nname = \"s{i}\"\n{TAIL}"))
        .collect();
    std::fs::write(&path, services).unwrap();
    for args in [vec!["check"], vec!["plugins"], vec!["print-config"]] {
        // `| head -c 1`: the reader goes away after one byte.
        let script = format!(
            "{} -c {} {} | head -c 1 >/dev/null; echo \"status=${{PIPESTATUS[0]}}\"",
            bin().display(),
            path.display(),
            args.join(" ")
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(stdout(&out), "status=0\n", "{args:?}: {}", show(&out));
        assert_eq!(stderr(&out), "", "{args:?}: {}", show(&out));
    }
}

#[test]
fn counts_take_their_plural_and_status_names_the_config_absolutely() {
    let dir = tempdir();
    let config = format!(
        "[control]\nsocket = \"{}/ctl.sock\"\n[[service]]\nname = \"a\"\nworkers = 1\n{TAIL}",
        dir.path().display()
    );
    std::fs::write(dir.path().join("rel.toml"), &config).unwrap();
    // Started as a user would, with a path relative to where they are.
    let mut cmd = Command::new(bin());
    cmd.args(["-c", "rel.toml"]);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    d.wait_log("master pid");
    let log = d.log_text();
    assert!(
        log.contains("starting 1 worker in 1 service (generation 1)"),
        "{log}"
    );
    assert!(log.contains("ready: a (1 worker)"), "{log}");
    let absolute = d.path("rel.toml").display().to_string();
    let v = status_at(&d.path("rel.toml"), &d);
    assert_eq!(v["config"], absolute.as_str());
    let out = run_cli(&d.path("rel.toml"), &["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v = status_at(&d.path("rel.toml"), &d);
    assert_eq!(
        v["config"],
        absolute.as_str(),
        "the same form after a reload"
    );
    let out = run_cli(&d.path("rel.toml"), &["check"]);
    assert!(
        stdout(&out).contains("service a: plugin echo, 1 worker x 1 thread, listen"),
        "{}",
        show(&out)
    );
}
