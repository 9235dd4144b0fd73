//! Binary upgrade (SIGUSR2, `preforkd upgrade`): a Unix listener and a TCP
//! listener survive it with a client running across it, the pid file names
//! the new master, a new master that cannot boot leaves the old one
//! serving untouched.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

fn config(extra: &str) -> String {
    format!(
        "[daemon]\npid_file = \"{{dir}}/preforkd.pid\"\nupgrade_timeout = \"20s\"\n\
         [control]\nsocket = \"{{dir}}/control.sock\"\n{}",
        service(
            "echo",
            &["tcp://127.0.0.1:0", "unix:{dir}/echo.sock"],
            "echo",
            &format!("workers = 2\nthreads = 4\ngraceful_timeout = \"5s\"\n{extra}"),
        )
    )
}

/// One request/response on a persistent Unix connection, reconnecting (and
/// resending) after a clean close at a request boundary. Returns an error
/// for anything else: refused, reset, a wrong or partial answer.
fn unix_exchange(path: &Path, conn: &mut Option<UnixStream>, msg: &[u8]) -> Result<bool, String> {
    for _ in 0..20 {
        if conn.is_none() {
            let s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            *conn = Some(s);
        }
        let s = conn.as_mut().unwrap();
        if let Err(e) = s.write_all(msg) {
            return Err(format!("write: {e}"));
        }
        let mut got = vec![0u8; msg.len()];
        let mut n = 0;
        while n < msg.len() {
            match s.read(&mut got[n..]) {
                Ok(0) if n == 0 => break,
                Ok(0) => return Err(format!("EOF after {n} of {} bytes", msg.len())),
                Ok(k) => n += k,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        if n == 0 {
            // Closed at a boundary by a retiring worker: reconnect, resend.
            *conn = None;
            continue;
        }
        return if got == msg {
            Ok(true)
        } else {
            Err("wrong answer".into())
        };
    }
    Err("closed 20 times in a row".into())
}

/// Runs clients on the Unix socket (persistent) and on TCP (a new
/// connection per request) until stopped; returns (ok, failures).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(d: &Daemon) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let unix = d.path("echo.sock");
        for t in 0..4 {
            let (stop, ok, unix) = (stop.clone(), ok.clone(), unix.clone());
            threads.push(std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut conn = None;
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let msg = format!("unix {t} {i}\n");
                    match unix_exchange(&unix, &mut conn, msg.as_bytes()) {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            failures.push(e);
                            conn = None;
                            0
                        }
                    };
                    i += 1;
                }
                failures
            }));
        }
        let tcp = d.addr("tcp", "echo");
        let (stop2, ok2) = (stop.clone(), ok.clone());
        threads.push(std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                match echo_once(tcp, format!("tcp {i}\n").as_bytes()) {
                    Ok(()) => {
                        ok2.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.push(e),
                }
                i += 1;
            }
            failures
        }));
        Load { stop, ok, threads }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

#[test]
fn unix_and_tcp_listeners_survive_upgrades() {
    let mut d = Daemon::start(&config(""));
    d.wait_ready();
    let first = d.pid();
    let load = Load::start(&d);
    wait_for(DEADLINE, || {
        (load.ok.load(Ordering::SeqCst) > 50).then_some(())
    })
    .unwrap_or_else(|| panic!("the clients do not get answers; log:\n{}", d.log_text()));

    let out = cli(&d, &["upgrade"]);
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let second = pid_file_pid(&d.path("preforkd.pid")).expect("a pid file");
    assert_ne!(second, first);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("master pid {second} took over from pid {first}")),
        "{}",
        show(&out)
    );
    assert_eq!(title(second), "preforkd: master");
    // The old master leaves, cleanly, once its workers are gone.
    assert_eq!(
        d.wait_exit(DEADLINE).code(),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    assert!(d.path("echo.sock").exists(), "the Unix socket file is gone");
    let v = wait_settled(&d);
    assert_eq!(v["pid"], second);
    assert_eq!(v["generation"], 2);

    // And once more, from the new master.
    let before = load.ok.load(Ordering::SeqCst);
    let out = cli(&d, &["upgrade"]);
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let third = pid_file_pid(&d.path("preforkd.pid")).unwrap();
    assert_ne!(third, second);
    wait_for(DEADLINE, || {
        (!alive(second) || state(second) == Some('Z')).then_some(())
    })
    .unwrap_or_else(|| panic!("master {second} did not leave; log:\n{}", d.log_text()));
    wait_for(DEADLINE, || {
        (load.ok.load(Ordering::SeqCst) > before + 50).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no answers after the second upgrade; log:\n{}",
            d.log_text()
        )
    });
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{failures:?}\nlog:\n{}", d.log_text());
    eprintln!("{ok} requests answered across two upgrades, 0 failures");
    let v = wait_settled(&d);
    assert_eq!(
        (v["pid"].as_i64(), v["generation"].as_i64()),
        (Some(third as i64), Some(3))
    );
    let log = d.log_text();
    let adopted = log
        .lines()
        .filter(|l| l.contains("adopted unix:") && l.contains("echo.sock"))
        .count();
    assert_eq!(adopted, 2, "log:\n{log}");

    // A stop of the last master removes what the first one created.
    let out = cli(&d, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    // Not our child: it may stay a zombie until init reaps it.
    wait_for(DEADLINE, || {
        (!alive(third) || state(third) == Some('Z')).then_some(())
    })
    .unwrap_or_else(|| panic!("master {third} still runs; log:\n{}", d.log_text()));
    assert!(!d.path("echo.sock").exists());
    assert!(!d.path("control.sock").exists());
    assert!(!d.path("preforkd.pid").exists());
}

#[test]
fn a_new_master_that_cannot_boot_leaves_the_old_one_serving() {
    let d = Daemon::start(&config(""));
    d.wait_ready();
    let workers = {
        let mut w = d.wait_workers(2);
        w.sort();
        w
    };
    // The file the new master will read: its workers cannot initialise.
    d.write_config(&config("[service.handler.options]\nfoo = 1"));
    let out = cli(&d, &["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("takes no options"), "{}", show(&out));
    assert!(
        d.log_text().contains("upgrade failed after"),
        "log:\n{}",
        d.log_text()
    );
    assert_eq!(pid_file_pid(&d.path("preforkd.pid")), Some(d.pid()));
    let mut now = d.wait_workers(2);
    now.sort();
    assert_eq!(now, workers, "the old workers were touched");
    echo_once(d.addr("tcp", "echo"), b"still here\n").unwrap();
    let mut u = UnixStream::connect(d.path("echo.sock")).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.write_all(b"unix too\n").unwrap();
    let mut buf = [0u8; 9];
    u.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"unix too\n");

    // With the config fixed, the next upgrade goes through.
    d.write_config(&config(""));
    let out = cli(&d, &["upgrade"]);
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        show(&out),
        d.log_text()
    );
    let v = wait_settled(&d);
    assert_ne!(v["pid"], d.pid());
}

#[test]
fn sigusr2_upgrades_too() {
    let d = Daemon::start(&config(""));
    d.wait_ready();
    d.signal(libc::SIGUSR2);
    let new = wait_for(DEADLINE, || {
        pid_file_pid(&d.path("preforkd.pid")).filter(|p| *p != d.pid())
    })
    .unwrap_or_else(|| panic!("no new master; log:\n{}", d.log_text()));
    wait_for(DEADLINE, || {
        (!alive(d.pid()) || state(d.pid()) == Some('Z')).then_some(())
    })
    .unwrap_or_else(|| panic!("the old master stays; log:\n{}", d.log_text()));
    let v = wait_settled(&d);
    assert_eq!(v["pid"], new);
    echo_once(d.addr("tcp", "echo"), b"after USR2\n").unwrap();
    // A refused connection would show as an error kind here.
    match UnixStream::connect(d.path("echo.sock")) {
        Ok(_) => {}
        Err(e) => assert_ne!(e.kind(), ErrorKind::ConnectionRefused),
    }
}
