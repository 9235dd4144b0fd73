//! Socket activation: preforkd run by `systemd-socket-activate` (from the
//! systemd package), which binds the sockets, sets LISTEN_FDS, LISTEN_PID
//! and LISTEN_FDNAMES, and execs preforkd (Accept=no: one daemon, its
//! workers accept). Skipped, with a message, when the tool is missing.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn activator() -> Option<&'static str> {
    let found = Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: systemd-socket-activate is not installed (the systemd package)");
    }
    found.then_some("systemd-socket-activate")
}

/// Runs `preforkd -c CONFIG` under systemd-socket-activate with `listen`
/// addresses (`-l`) and their names.
fn start(tool: &str, config: &str, listen: &[String], names: &[&str]) -> Daemon {
    let dir = tempdir();
    let config = config.replace("{dir}", dir.path().to_str().unwrap());
    let listen: Vec<String> = listen
        .iter()
        .map(|l| l.replace("{dir}", dir.path().to_str().unwrap()))
        .collect();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(tool);
    for l in &listen {
        cmd.arg("-l").arg(l);
    }
    if !names.is_empty() {
        cmd.arg(format!("--fdname={}", names.join(":")));
    }
    cmd.arg("--").arg(bin()).arg("-c").arg(&path);
    let d = Daemon::spawn(cmd, dir, &[]);
    wait_listening(&d, listen.len());
    d
}

/// Without --accept, systemd-socket-activate binds, then waits for the
/// first connection (or datagram) before it execs preforkd, like systemd
/// with Accept=no: the tests' first exchange starts the daemon, and is
/// served by it.
fn wait_listening(d: &Daemon, n: usize) {
    wait_for(DEADLINE, || {
        (d.count_log("Listening on ") >= n).then_some(())
    })
    .unwrap_or_else(|| panic!("the activator is not listening; log:\n{}", d.log_text()));
}

fn echo_unix(path: &Path, payload: &[u8]) -> Result<(), String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got == payload {
        Ok(())
    } else {
        Err(format!("mismatch: {got:?}"))
    }
}

/// Named fds over TCP and a Unix socket: both adopted, not bound; echo
/// works on both; the Unix socket's file survives the stop (systemd's);
/// an fd nobody uses is a warning.
#[test]
fn adopts_named_tcp_and_unix_sockets() {
    let Some(tool) = activator() else { return };
    let port = free_port();
    let config = service(
        "web",
        &["systemd:web", "systemd:unixsock"],
        "echo",
        "workers = 2",
    );
    let d = start(
        tool,
        &config,
        &[
            format!("127.0.0.1:{port}"),
            "{dir}/a.sock".into(),
            "{dir}/spare.sock".into(),
        ],
        &["web", "unixsock", "spare"],
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // Starts preforkd, which serves the connection that woke it.
    echo_once(addr, b"wake up\n").unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log_text()));
    d.wait_ready();
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "adopted tcp://127.0.0.1:{port} from systemd (socket activation, FileDescriptorName=web) for systemd:web, not bound"
        )),
        "{log}"
    );
    let sock = d.path("a.sock");
    assert!(
        log.contains(&format!(
            "adopted unix:{} from systemd (socket activation, FileDescriptorName=unixsock)",
            sock.display()
        )),
        "{log}"
    );
    assert!(
        log.contains("systemd passed a socket named \"spare\" that no service uses; closing it"),
        "{log}"
    );
    echo_once(addr, b"over tcp\n").unwrap();
    echo_unix(&sock, b"over unix\n").unwrap();

    let mut d = d;
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}; log:\n{}", d.log_text());
    assert!(sock.exists(), "systemd's socket file was unlinked");
}

/// Without names: an inherited socket bound to a `listen` address is
/// adopted for it instead of being bound (which would fail: the address
/// is taken).
#[test]
fn adopts_a_socket_matching_a_listen_address() {
    let Some(tool) = activator() else { return };
    let port = free_port();
    let config = service(
        "echo",
        &[&format!("tcp://127.0.0.1:{port}"), "unix:{dir}/b.sock"],
        "echo",
        "workers = 1",
    );
    let mut d = start(
        tool,
        &config,
        &[format!("127.0.0.1:{port}"), "{dir}/b.sock".into()],
        &[],
    );
    let sock = d.path("b.sock");
    echo_unix(&sock, b"wake up\n").unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log_text()));
    d.wait_ready();
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "adopted tcp://127.0.0.1:{port} from systemd (socket activation, FileDescriptorName=unknown) for tcp://127.0.0.1:{port}, not bound"
        )),
        "{log}"
    );
    echo_once(format!("127.0.0.1:{port}").parse().unwrap(), b"x\n").unwrap();
    echo_unix(&sock, b"y\n").unwrap();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(DEADLINE).success(), "{}", d.log_text());
    assert!(sock.exists(), "systemd's socket file was unlinked");
}

/// Sockets adopted from systemd are kept by a reload (same key) and
/// handed over by a binary upgrade; the Unix file is never unlinked.
#[test]
fn adopted_sockets_survive_reload_and_upgrade() {
    let Some(tool) = activator() else { return };
    let port = free_port();
    let config = format!(
        "[control]\nsocket = \"{{dir}}/ctl.sock\"\n[daemon]\npid_file = \"{{dir}}/p.pid\"\n{}",
        service(
            "web",
            &["systemd:web", "systemd:unixsock"],
            "echo",
            "workers = 1"
        )
    );
    let d = start(
        tool,
        &config,
        &[format!("127.0.0.1:{port}"), "{dir}/c.sock".into()],
        &["web", "unixsock"],
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    echo_once(addr, b"wake up\n").unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log_text()));
    d.wait_ready();
    let sock = d.path("c.sock");
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{}", show(&out));
    echo_once(addr, b"after reload\n").unwrap();
    echo_unix(&sock, b"after reload\n").unwrap();

    let out = cli(&d, &["upgrade"]);
    assert!(out.status.success(), "{}", show(&out));
    let new = wait_for(DEADLINE, || {
        pid_file_pid(&d.path("p.pid")).filter(|p| *p != d.pid())
    })
    .unwrap_or_else(|| panic!("no new master; log:\n{}", d.log_text()));
    // The new master is not our child: kill its group at the end.
    struct Group(i32);
    impl Drop for Group {
        fn drop(&mut self) {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(-self.0, libc::SIGKILL) };
        }
    }
    let _group = Group(new);
    echo_once(addr, b"after upgrade\n").unwrap();
    echo_unix(&sock, b"after upgrade\n").unwrap();
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(new, libc::SIGTERM) };
    wait_for(DEADLINE, || (!alive(new)).then_some(()))
        .unwrap_or_else(|| panic!("the new master did not stop; log:\n{}", d.log_text()));
    assert!(sock.exists(), "systemd's socket file was unlinked");
    assert!(d.log_text().contains("adopted unix:"), "{}", d.log_text());
}

/// A service naming a socket systemd did not pass: config error, exit 78.
#[test]
fn a_missing_systemd_socket_is_a_config_error() {
    let Some(tool) = activator() else { return };
    let port = free_port();
    let config = service("web", &["systemd:missing"], "echo", "");
    let mut d = start(tool, &config, &[format!("127.0.0.1:{port}")], &["web"]);
    // Wakes the activator, which starts preforkd.
    let _wake = connect(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(78), "log:\n{}", d.log_text());
    assert!(
        d.log_text()
            .contains("cannot listen on systemd:missing: systemd passed no socket named \"missing\" (LISTEN_FDNAMES: web)"),
        "{}",
        d.log_text()
    );
}

/// A `systemd:NAME` datagram socket: its kind comes from the socket
/// (SO_TYPE), and the workers serve it as a Unix datagram socket.
#[test]
fn adopts_a_named_datagram_socket() {
    let Some(tool) = activator() else { return };
    let dir = tempdir();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, service("dg", &["systemd:dg"], "echo", "workers = 1")).unwrap();
    let sock = dir.path().join("dg.sock");
    let client_path = dir.path().join("client.sock");
    let mut cmd = Command::new(tool);
    cmd.arg("--datagram")
        .arg("-l")
        .arg(&sock)
        .arg("--fdname=dg")
        .arg("--")
        .arg(bin())
        .arg("-c")
        .arg(&path);
    let mut d = Daemon::spawn(cmd, dir, &[]);
    wait_listening(&d, 1);
    let client = std::os::unix::net::UnixDatagram::bind(&client_path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The datagram wakes the activator; preforkd then serves it.
    client.send_to(b"ping", &sock).unwrap();
    let mut buf = [0u8; 64];
    let n = client
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no echo ({e}); log:\n{}", d.log_text()));
    assert_eq!(&buf[..n], b"ping");
    d.wait_ready();
    assert!(
        d.log_text()
            .contains(&format!("adopted unixgram:{} from systemd", sock.display())),
        "{}",
        d.log_text()
    );
    // And again, now that it runs.
    client.send_to(b"pong", &sock).unwrap();
    let n = client
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no echo ({e}); log:\n{}", d.log_text()));
    assert_eq!(&buf[..n], b"pong");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(DEADLINE).success(), "{}", d.log_text());
    assert!(sock.exists(), "systemd's socket file was unlinked");
}

/// A socket adopted at start by its address cannot become `systemd:NAME`
/// by a reload: the reload fails with what is true (systemd passes its
/// sockets at start only, and which this master holds), and the old
/// generation keeps serving.
#[test]
fn a_reload_naming_a_systemd_socket_says_what_is_true() {
    let Some(tool) = activator() else { return };
    let port = free_port();
    let head = "[control]\nsocket = \"{dir}/ctl.sock\"\n";
    let listen = format!("tcp://127.0.0.1:{port}");
    let config = format!(
        "{head}{}",
        service("web", &[&listen], "echo", "workers = 1")
    );
    let d = start(tool, &config, &[format!("127.0.0.1:{port}")], &["web"]);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    echo_once(addr, b"wake up\n").unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log_text()));
    d.wait_ready();
    d.write_config(&format!(
        "{head}{}",
        service("web", &["systemd:other"], "echo", "workers = 1")
    ));
    let out = cli(&d, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains(&format!(
            "cannot listen on systemd:other: systemd passes its sockets only when the service starts, so a reload cannot take a socket named \"other\" (this master adopted tcp://127.0.0.1:{port} by its address); keep the listen entries of those sockets as they were, or restart the service to use systemd:other"
        )),
        "{}",
        show(&out)
    );
    echo_once(addr, b"still serving\n").unwrap();
}
