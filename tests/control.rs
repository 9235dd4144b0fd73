//! The control socket and the CLI over it: status (JSON and table), scale,
//! stop that waits, clients that idle or send garbage, a client of another
//! uid, and the pid-file fallback without a control socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn config() -> String {
    format!(
        "[daemon]\npid_file = \"{{dir}}/preforkd.pid\"\n[control]\nsocket = \"{{dir}}/control.sock\"\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 2")
    )
}

fn raw_client(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(d.path("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn ask(s: &mut UnixStream, line: &[u8]) -> serde_json::Value {
    s.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(&*s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[test]
fn status_json_and_table() {
    let d = Daemon::start(&config());
    d.wait_ready();
    let v = wait_settled(&d);
    assert_eq!(v["pid"], d.pid());
    assert_eq!(v["generation"], 1);
    assert_eq!(v["services"][0]["plugin"], "echo");
    let addr = d.addr("tcp", "echo");
    assert_eq!(v["services"][0]["listeners"][0], format!("tcp://{addr}"));
    let mut pids: Vec<i64> = status_workers(&v, "echo")
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    pids.sort();
    let mut children: Vec<i64> = d.workers().into_iter().map(i64::from).collect();
    children.sort();
    assert_eq!(pids, children);

    for i in 0..5 {
        echo_once(addr, format!("{i}\n").as_bytes()).unwrap();
    }
    let served = wait_for(DEADLINE, || {
        let v = status(&d);
        let n: u64 = status_workers(&v, "echo")
            .iter()
            .map(|w| w["served"].as_u64().unwrap())
            .sum();
        (n == 5).then_some(n)
    });
    assert_eq!(
        served,
        Some(5),
        "served counters; status:\n{:#}",
        status(&d)
    );

    let out = cli(&d, &["status"]);
    assert!(out.status.success(), "{}", show(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&format!("master pid {}, running", d.pid())),
        "{table}"
    );
    assert!(
        table.contains("service echo (plugin echo, 2 workers)"),
        "{table}"
    );
    for p in &pids {
        assert!(table.contains(&p.to_string()), "{table}");
    }
}

#[test]
fn scale_changes_the_pool() {
    let d = Daemon::start(&config());
    d.wait_ready();
    let out = cli(&d, &["scale", "echo", "4"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 workers (was 2)"));
    d.wait_workers(4);
    let out = cli(&d, &["scale", "echo", "1"]);
    assert!(out.status.success(), "{}", show(&out));
    d.wait_workers(1);
    let out = cli(&d, &["scale", "nope", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service \"nope\""));
    let out = cli(&d, &["scale", "echo", "0"]);
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
    echo_once(d.addr("tcp", "echo"), b"x\n").unwrap();
}

#[test]
fn stop_waits_for_the_exit() {
    let mut d = Daemon::start(&config());
    d.wait_ready();
    let out = cli(&d, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("has exited"));
    // The answer comes just before the exit: the master is gone within moments.
    let status = d.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    assert!(!d.path("control.sock").exists());
}

#[test]
fn survives_idle_and_garbage_clients() {
    let d = Daemon::start(&config());
    d.wait_ready();
    // Connected, silent.
    let mut idle = raw_client(&d);
    // Garbage, then a real request on the same connection.
    let mut noisy = raw_client(&d);
    let v = ask(&mut noisy, b"\x00\xffgarbage \x07\n");
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().unwrap().contains("unknown request"),
        "{v}"
    );
    let v = ask(&mut noisy, b"status\n");
    assert_eq!(v["ok"], true);
    // Two requests in one write: two answers, in order.
    noisy.write_all(b"status\nbogus\n").unwrap();
    let mut r = BufReader::new(&noisy);
    let (mut a, mut b) = (String::new(), String::new());
    r.read_line(&mut a).unwrap();
    r.read_line(&mut b).unwrap();
    assert!(
        a.contains("\"ok\":true") && b.contains("\"ok\":false"),
        "{a}{b}"
    );
    // An endless line: an error, then the connection is closed.
    let mut long = raw_client(&d);
    let _ = long.write_all(&[b'x'; 10_000]);
    let mut rest = String::new();
    let _ = long.read_to_string(&mut rest);
    assert!(rest.contains("longer than 4096 bytes"), "{rest:?}");
    // Meanwhile the master answers others at once and keeps serving.
    let t = Instant::now();
    assert_eq!(status(&d)["ok"], true);
    assert!(t.elapsed() < Duration::from_secs(5));
    echo_once(d.addr("tcp", "echo"), b"served\n").unwrap();
    // The silent one is dropped after its 10 s.
    let mut buf = [0u8; 1];
    let n = idle.read(&mut buf).expect("EOF, not a timeout");
    assert_eq!(n, 0);
    assert_eq!(status(&d)["state"], "running");
}

#[test]
fn refuses_another_uid() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: refuses_another_uid needs root to run a client as nobody");
        return;
    }
    let d = Daemon::start(&config());
    d.wait_ready();
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        d.path("preforkd.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let as_nobody = || {
        let child = Command::new(bin())
            .arg("-c")
            .arg(d.path("preforkd.toml"))
            .args(["status"])
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.wait_with_output().unwrap()
    };
    // Mode 0600: connect() itself is refused.
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        show(&out)
    );
    // Opened up by mistake: the master still refuses by uid.
    std::fs::set_permissions(
        d.path("control.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without answering"),
        "{}",
        show(&out)
    );
    d.wait_log("control socket: refused client uid 65534");
    assert_eq!(status(&d)["ok"], true, "root is still answered");
}

#[test]
fn without_a_control_socket_reload_falls_back_to_a_signal() {
    let d = Daemon::start(&format!(
        "[daemon]\npid_file = \"{{dir}}/preforkd.pid\"\n{}",
        service("echo", &["tcp://127.0.0.1:0"], "echo", "workers = 1")
    ));
    d.wait_ready();
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the outcome cannot be reported"),
        "{}",
        show(&out)
    );
    d.wait_log("reload (generation 2) succeeded");
    let out = cli(&d, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [control] socket"));
    echo_once(d.addr("tcp", "echo"), b"after\n").unwrap();
}
