//! The units in systemd/: `systemd-analyze verify` accepts both without a
//! warning, the service's exposure score stays at what docs/OPERATIONS.md
//! says, and its Exec lines are command lines the binary accepts, in order.
//! Skipped, with a message, where systemd-analyze is missing (.ci/run
//! installs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The exposure score recorded in docs/OPERATIONS.md ("Under systemd");
/// the unit must not exceed it.
const MAX_EXPOSURE: f64 = 2.5;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// The units copied to a temp dir, with /usr/bin/preforkd rewritten to
/// the binary under test (verify checks that ExecStart= exists).
fn copy_units(dir: &Path) {
    for name in ["preforkd.service", "preforkd.socket"] {
        let text = std::fs::read_to_string(units_dir().join(name)).unwrap();
        let text = text.replace("/usr/bin/preforkd", bin().to_str().unwrap());
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn have_systemd_analyze() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP: systemd-analyze is missing (apt-get install systemd)");
    }
    found
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have_systemd_analyze() {
        return;
    }
    let dir = tempdir();
    copy_units(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("preforkd.service"))
        .arg(dir.path().join("preforkd.socket"))
        .output()
        .unwrap();
    // verify exits 0 on a directive it cannot parse (it only warns): any
    // output at all is a finding.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        show(&out)
    );
}

#[test]
fn the_service_exposure_stays_low() {
    if !have_systemd_analyze() {
        return;
    }
    let dir = tempdir();
    copy_units(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("preforkd.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            let rest = l
                .split("Overall exposure level for preforkd.service:")
                .nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no exposure level: {}", show(&out)));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE} (update docs/OPERATIONS.md if intended):\n{text}"
    );
}

/// The value of `Key=` in the service file, split into words, with the
/// config path replaced by `config`.
fn exec_line(key: &str, config: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(units_dir().join("preforkd.service")).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in preforkd.service"));
    line.split_whitespace()
        .map(|w| {
            if w == "/etc/preforkd/preforkd.toml" {
                config.to_str().unwrap().to_string()
            } else {
                w.to_string()
            }
        })
        .collect()
}

/// ExecStartPre= validates the config, ExecStart= runs the master,
/// ExecReload= reloads it and waits for the outcome, as the unit says.
#[test]
fn the_exec_lines_work_as_written() {
    let dir = tempdir();
    let config = dir.path().join("preforkd.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\npid_file = \"{0}/preforkd.pid\"\n[control]\nsocket = \"{0}/control.sock\"\n{1}",
            dir.path().display(),
            service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
        ),
    )
    .unwrap();
    let run = |key: &str| {
        let words = exec_line(key, &config);
        assert_eq!(words[0], "/usr/bin/preforkd", "{key}: {words:?}");
        let mut cmd = Command::new(bin());
        cmd.args(&words[1..]);
        cmd
    };
    let out = run("ExecStartPre").output().unwrap();
    assert!(out.status.success(), "ExecStartPre: {}", show(&out));

    let d = Daemon::spawn(run("ExecStart"), dir, &[]);
    d.wait_ready();
    // Bounded, so that a hang fails the test instead of stalling it.
    let out = run("ExecReload")
        .args(["--timeout", "60s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ExecReload: {}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reloaded: generation 2"),
        "{}",
        show(&out)
    );
}
