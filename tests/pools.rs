//! Adaptive pools: `pool = "dynamic"` grows under a burst and shrinks
//! after it; `pool = "ondemand"` starts with no worker, forks when a
//! connection waits, retires idle workers; both count the times they were
//! at `max_workers` with none idle.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

const CONTROL: &str = "[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// The service's entry in a status document.
fn svc<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name} in {v:#}"))
}

/// Opens a connection that stays open, and sends a line (answered once a
/// worker takes the connection).
fn hold(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"hold\n").unwrap();
    s
}

/// Waits for the echo of `hold`'s line: a worker serves the connection.
fn served(s: &mut TcpStream) {
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hold\n");
}

/// User + system CPU time of a process, in clock ticks (/proc/PID/stat).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15, the 12th and 13th after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn dynamic_grows_under_a_burst_and_shrinks_after() {
    let config = service(
        "dyn",
        &["tcp://127.0.0.1:0"],
        "echo",
        "pool = \"dynamic\"\nworkers = 2\nmin_spare = 1\nmax_spare = 2\nmax_workers = 6",
    );
    let d = Daemon::start(&format!("{CONTROL}{config}"));
    let out = cli(&d, &["check"]);
    assert!(
        stdout(&out).contains(
            "service dyn: plugin echo, dynamic pool of 2 to 6 workers (1 to 2 idle) x 1 thread"
        ),
        "{}",
        show(&out)
    );
    d.wait_ready();
    let addr = d.addr("tcp", "dyn");
    let v = wait_settled(&d);
    assert_eq!(svc(&v, "dyn")["pool"], "dynamic");
    assert_eq!(svc(&v, "dyn")["size"], 2);
    assert_eq!(svc(&v, "dyn")["max_workers"], 6);

    // A burst of 6 long connections: each holds a worker (threads = 1).
    let mut conns: Vec<TcpStream> = (0..6).map(|_| hold(addr)).collect();
    for c in &mut conns {
        served(c);
    }
    let v = wait_status(&d, "6 busy workers and the pool at max", |v| {
        let s = svc(v, "dyn");
        s["size"] == 6 && s["busy"] == 6 && s["pool_at_max"].as_u64() >= Some(1)
    });
    assert_eq!(svc(&v, "dyn")["idle"], 0);
    let out = cli(&d, &["status"]);
    assert!(
        stdout(&out).contains("\n  pool dynamic: 0 idle, 6 busy; max_workers 6, reached "),
        "{}",
        show(&out)
    );
    let log = d.log_text();
    // 1, then 2 while the shortage lasts (then capped by max_workers).
    let steps: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fewer than min_spare 1; starting "))
        .collect();
    assert!(
        steps.len() >= 2
            && steps[0].contains("; starting 1 (")
            && steps[1].contains("; starting 2 ("),
        "{log}"
    );
    assert!(
        log.contains("all 6 workers (max_workers) are busy"),
        "{log}"
    );

    // scale does not apply to a dynamic pool.
    let out = cli(&d, &["scale", "dyn", "3"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        stderr(&out).contains("has pool = \"dynamic\", whose size follows the load"),
        "{}",
        show(&out)
    );

    // The burst ends: one idle worker retired per tick down to max_spare.
    drop(conns);
    let v = wait_status(&d, "the pool back at max_spare", |v| {
        let s = svc(v, "dyn");
        s["size"] == 2 && s["idle"] == 2 && s["workers"].as_array().map(Vec::len) == Some(2)
    });
    assert_eq!(svc(&v, "dyn")["busy"], 0);
    assert!(
        d.log_text().contains("more than max_spare 2; retiring one"),
        "{}",
        d.log_text()
    );
    d.wait_workers(2);
    echo_once(addr, b"still serving\n").unwrap();
}

#[test]
fn ondemand_starts_with_none_forks_on_a_connection_and_retires_idle() {
    let config = service(
        "od",
        &["tcp://127.0.0.1:0"],
        "echo",
        "pool = \"ondemand\"\nmax_workers = 2\nidle_worker_timeout = \"1s\"",
    );
    let d = Daemon::start(&format!("{CONTROL}{config}"));
    d.wait_ready();
    let addr = d.addr("tcp", "od");
    let v = status(&d);
    assert_eq!(svc(&v, "od")["pool"], "ondemand");
    assert_eq!(svc(&v, "od")["size"], 0);
    assert!(
        d.workers().is_empty(),
        "workers at start: {:?}",
        d.workers()
    );
    assert_eq!(d.count_log(" spawned"), 0, "{}", d.log_text());

    // The first connection forks a worker, which serves it.
    echo_once(addr, b"first\n").unwrap();
    assert!(
        d.log_text()
            .contains("a connection waiting and no idle worker; starting 1"),
        "{}",
        d.log_text()
    );
    // Idle for idle_worker_timeout: retired, back to none.
    d.wait_log("idle for idle_worker_timeout (1s); retiring it");
    d.wait_workers(0);
    wait_status(&d, "an empty pool", |v| svc(v, "od")["size"] == 0);

    // Two held connections: two workers (max_workers); a third waits,
    // the pool counts that it hit max_workers, and it is served once a
    // worker frees up.
    let mut a = hold(addr);
    served(&mut a);
    let mut b = hold(addr);
    served(&mut b);
    let mut c = hold(addr);
    wait_status(&d, "the pool at max_workers", |v| {
        let s = svc(v, "od");
        s["size"] == 2 && s["busy"] == 2 && s["pool_at_max"].as_u64() >= Some(1)
    });
    // A listener that stays readable (the third connection waits) does
    // not spin the master: time must pass here, it is what is observed.
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(d.pid()) - before;
    assert!(
        used < 50,
        "the master used {used} clock ticks of CPU in 2 s while a connection waited"
    );
    drop(a);
    served(&mut c);
    drop((b, c));
    d.wait_workers(0);
}
