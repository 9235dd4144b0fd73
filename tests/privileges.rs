//! `[daemon] user` / `group`: workers drop to them after fork; the master
//! keeps root (a reload still binds new listeners); an unknown user is a
//! config error. Needs root: skipped with a message otherwise.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use common::*;

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no memory effects and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: privilege tests need root (CI runs them as root)");
            return;
        }
    };
}

/// The `Uid:`/`Gid:`/`Groups:` fields of /proc/PID/status.
fn ids(pid: i32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

fn config(listen: &[&str]) -> String {
    format!(
        "[daemon]\nuser = \"nobody\"\ngroup = \"nogroup\"\n[control]\nsocket = \"{{dir}}/control.sock\"\n{}",
        service("echo", listen, "echo", "workers = 2")
    )
}

fn assert_dropped(workers: &[i32], d: &Daemon) {
    for &w in workers {
        let (uid, gid, groups) = ids(w);
        assert_eq!(
            uid,
            vec![65534; 4],
            "worker {w} uids; log:\n{}",
            d.log_text()
        );
        assert_eq!(
            gid,
            vec![65534; 4],
            "worker {w} gids; log:\n{}",
            d.log_text()
        );
        assert!(
            groups.is_empty() || groups == vec![65534],
            "worker {w} groups {groups:?}"
        );
    }
}

#[test]
fn workers_run_as_nobody_and_the_master_stays_root() {
    require_root!();
    let d = Daemon::start(&config(&["tcp://127.0.0.1:0", "unix:{dir}/echo.sock"]));
    d.wait_ready();
    let addr = d.addr("tcp", "echo");
    let workers = d.wait_workers(2);
    assert_dropped(&workers, &d);
    let (uid, _, _) = ids(d.pid());
    assert_eq!(uid, vec![0; 4], "the master keeps root");
    echo_once(addr, b"hello as nobody\n").unwrap();

    // The service's socket file belongs to the workers' user; the control
    // socket stays root's.
    let meta = std::fs::metadata(d.path("echo.sock")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    let meta = std::fs::metadata(d.path("control.sock")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));

    // A reload binds a new TCP listener (as root) and its workers drop too.
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = spare.local_addr().unwrap().port();
    drop(spare);
    let new = format!("tcp://127.0.0.1:{port}");
    d.write_config(&config(&[
        "tcp://127.0.0.1:0",
        "unix:{dir}/echo.sock",
        new.as_str(),
    ]));
    let out = cli(&d, &["reload"]);
    assert!(
        out.status.success(),
        "reload: {}; log:\n{}",
        show(&out),
        d.log_text()
    );
    let workers = wait_for(DEADLINE, || {
        let w = d.workers();
        (w.len() == 2 && w.iter().all(|p| !workers.contains(p))).then_some(w)
    })
    .unwrap_or_else(|| panic!("no new generation; log:\n{}", d.log_text()));
    assert_dropped(&workers, &d);
    echo_once(format!("127.0.0.1:{port}").parse().unwrap(), b"again\n").unwrap();
    echo_once(addr, b"and the old one\n").unwrap();
}

#[test]
fn an_unknown_user_is_a_config_error_with_its_position() {
    let dir = tempdir();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nuser = \"no-such-user-x\"\n{}",
            service("echo", &["tcp://127.0.0.1:0"], "echo", "")
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(
        stderr.contains(&format!(
            "{}:2:8: unknown user \"no-such-user-x\"",
            path.display()
        )),
        "{}",
        show(&out)
    );

    std::fs::write(
        &path,
        format!(
            "[daemon]\nuser = \"nobody\"\ngroup = \"no-such-group-x\"\n{}",
            service("echo", &["tcp://127.0.0.1:0"], "echo", "")
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("check")
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(":3:9: unknown group \"no-such-group-x\""),
        "{}",
        show(&out)
    );
}

#[test]
fn a_worker_that_cannot_drop_fails_to_boot_with_the_reason() {
    require_root!();
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: setpriv (util-linux) is not installed");
        return;
    }
    // A master that is not root cannot change its workers' user.
    let dir = tempdir();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nuser = \"nobody\"\n{}",
            service("echo", &["tcp://127.0.0.1:0"], "echo", "")
        ),
    )
    .unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .arg("-c")
        .arg(&path);
    let mut d = Daemon::spawn(cmd, dir, &[]);
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(78), "log:\n{}", d.log_text());
    d.wait_log(
        "failed to boot: cannot drop privileges to user \"nobody\" (uid 65534, gid 65534): setgroups failed: EPERM",
    );
}

/// Audit row: the Unix socket file belongs to the workers' user, who can
/// replace it with a symlink; the next reload chmod'ed and chown'ed the
/// link's target (a root 0600 file became `nobody:nogroup`). The master
/// now acts only on the socket file it bound (same device and inode, no
/// symlink followed) and leaves anything else alone, saying so.
#[test]
fn a_reload_does_not_follow_a_symlink_planted_for_the_socket_file() {
    require_root!();
    let dir = tempdir();
    // A directory of the workers' user, as /run/app often is.
    let sockdir = dir.path().join("sockets");
    std::fs::create_dir(&sockdir).unwrap();
    std::os::unix::fs::chown(&sockdir, Some(65534), Some(65534)).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let sock = sockdir.join("echo.sock");
    let cfg =
        config(&["unix:{dir}/sockets/echo.sock"]).replace("{dir}", dir.path().to_str().unwrap());
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("-c").arg(&path);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65534, 65534),
        "the socket file is the workers'"
    );
    // The workers' user swaps the socket file for a link to the secret.
    std::fs::remove_file(&sock).unwrap();
    std::os::unix::fs::symlink(&secret, &sock).unwrap();
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{}", show(&out));
    let m = std::fs::metadata(&secret).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (0, 0, 0o600),
        "the reload changed the link's target; log:\n{}",
        d.log_text()
    );
    d.wait_log("is no longer the socket preforkd bound");
}

/// The CapInh/CapPrm/CapEff/CapAmb masks of /proc/PID/status.
fn capabilities(pid: i32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"]
        .iter()
        .map(|name| {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
            (name.to_string(), u64::from_str_radix(v.trim(), 16).unwrap())
        })
        .collect()
}

/// systemd's AmbientCapabilities= puts capabilities in the inheritable
/// and ambient sets, which setuid alone does not clear: a master started
/// with them (here by capsh) has workers with none at all.
#[test]
fn workers_drop_inheritable_and_ambient_capabilities() {
    require_root!();
    let capsh = ["/usr/sbin/capsh", "/sbin/capsh", "/usr/bin/capsh"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(capsh) = capsh else {
        eprintln!("skipped: needs capsh (package libcap2-bin)");
        return;
    };
    let dir = tempdir();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(
        &path,
        config(&["tcp://127.0.0.1:0"]).replace("{dir}", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let mut cmd = Command::new(capsh);
    cmd.args([
        "--inh=cap_net_bind_service",
        "--addamb=cap_net_bind_service",
        "--",
        "-c",
        r#"exec "$0" -c "$1""#,
    ])
    .arg(bin())
    .arg(&path);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    // The master really has them (else the test proves nothing).
    let master = capabilities(d.pid());
    assert!(
        master[0].1 != 0 && master[3].1 != 0,
        "capsh gave the master no inheritable/ambient set: {master:?}"
    );
    for w in d.wait_workers(2) {
        let caps = capabilities(w);
        assert!(
            caps.iter().all(|(_, m)| *m == 0),
            "worker {w} keeps capabilities {caps:?}; log:\n{}",
            d.log_text()
        );
    }
    echo_once(d.addr("tcp", "echo"), b"no capabilities\n").unwrap();
}
