//! The `exec` plugin in `mode = "async"` workers, with the real binary: one
//! loop runs every program of its worker (500 at once on one worker), the
//! UCSPI environment, `timeout` and the kill of the program's whole process
//! group, datagram runs, the graceful stop (programs finish, the client
//! gets all output and a FIN), access rules, and the open files limit a
//! program gets back.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const HEAD: &str =
    "[daemon]\npid_file = \"{dir}/preforkd.pid\"\n\n[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// A config of one async exec service named `x`; `extra` goes into its
/// [[service]] table, `options` into its options table.
fn exec_service(listen: &[&str], extra: &str, options: &str) -> String {
    format!(
        "{HEAD}{}\n[service.handler.options]\n{options}\n",
        service("x", listen, "exec", &format!("mode = \"async\"\n{extra}"))
    )
}

/// A daemon whose temp dir holds the scripts before the config is written.
fn start_with(scripts: &[(&str, &str)], config: impl Fn(&Path) -> String) -> Daemon {
    let dir = tempdir();
    for (name, body) in scripts {
        script(dir.path(), name, body);
    }
    let path = dir.path().join("preforkd.toml");
    let text = config(dir.path()).replace("{dir}", dir.path().to_str().unwrap());
    std::fs::write(&path, text).unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("-c").arg(&path);
    Daemon::spawn(cmd, dir, &[])
}

/// The open files limit of this process: (soft, hard).
fn nofile() -> (u64, u64) {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap()
}

/// Process `pid`'s "Max open files" from /proc/PID/limits: (soft, hard).
fn nofile_of(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect(&limits);
    let mut f = line["Max open files".len()..].split_whitespace();
    (f.next().unwrap().into(), f.next().unwrap().into())
}

/// `cat`, echoing every write until the client closes its side.
fn cat_service(extra: &str) -> String {
    exec_service(&["tcp://127.0.0.1:0"], extra, "command = [\"/bin/cat\"]")
}

/// One line out, the same line back.
fn echo_line(s: &mut TcpStream, line: &str) -> Result<(), String> {
    s.write_all(line.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let got = read_line(s).map_err(|e| format!("read: {e}"))?;
    if got != line {
        return Err(format!("sent {line:?}, got {got:?}"));
    }
    Ok(())
}

#[test]
fn cat_echoes_in_async_mode_over_tcp_and_unix_and_its_bytes_are_counted() {
    let d = start_with(&[], |dir| {
        exec_service(
            &[
                "tcp://127.0.0.1:0",
                &format!("unix:{}/x.sock", dir.display()),
            ],
            "workers = 1",
            "command = [\"/bin/cat\"]",
        )
    });
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "x")).unwrap();
    echo_line(&mut s, "hello async\n").unwrap();
    // A large transfer both ways, the client writing while it reads.
    const N: usize = 200_000;
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            s.write_all(&vec![b'p'; N]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let echoed = read_to_eof(&mut s).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed.len(), N);
    assert!(echoed.iter().all(|&b| b == b'p'));
    drop(s);

    let mut u = connect_unix(&d.path("x.sock")).unwrap();
    u.write_all(b"over unix\n").unwrap();
    u.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut u).unwrap(), b"over unix\n");

    // The program moved the bytes itself: TCP's totals count them.
    let total = (N + "hello async\n".len()) as u64;
    let v = wait_status(&d, "the connection's bytes", |v| {
        status_workers(v, "x")
            .iter()
            .any(|w| w["bytes_in"].as_u64() == Some(total))
    });
    let w = status_workers(&v, "x")[0];
    assert_eq!(w["bytes_out"].as_u64(), Some(total), "{w}");
    // And the plugin says it serves both modes.
    let plugins = stdout(&run_cli(&d.path("preforkd.toml"), &["plugins"]));
    let line = plugins
        .lines()
        .find(|l| l.starts_with("exec "))
        .expect(&plugins);
    assert!(line.contains("threads, async"), "{line}");
}

/// Connections each client thread opens in the 500-program test.
const PER_THREAD: usize = 125;
const THREADS: usize = 4;

#[test]
fn five_hundred_programs_at_once_on_one_async_worker() {
    let want = (THREADS * PER_THREAD) as u64;
    // The daemon: 600 connections of 3 descriptors (socket, pidfd, stderr
    // pipe) and its base; this test: 500 sockets and its own.
    let (soft, hard) = nofile();
    if hard < 2048 {
        eprintln!(
            "skipped: the hard open files limit is {hard} (ulimit -Hn); 600 exec connections need about 1,900"
        );
        return;
    }
    if soft < want + 200 {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .unwrap();
    }
    let d = Daemon::start(&cat_service("workers = 1\nworker_connections = 600"));
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    let worker = d.wait_workers(1)[0];
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS + 1));
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<(), String> {
                // Every connection echoes once: its program is running.
                let mut held = Vec::new();
                let mut failed = None;
                for i in 0..PER_THREAD {
                    let opened = connect(addr)
                        .map_err(|e| format!("connect: {e}"))
                        .and_then(|mut s| echo_line(&mut s, &format!("{t}.{i}\n")).map(|()| s));
                    match opened {
                        Ok(s) => held.push(s),
                        Err(e) => {
                            failed = Some(format!("connection {t}.{i}: {e}"));
                            break;
                        }
                    }
                }
                barrier.wait(); // all open (the test counts the programs)
                barrier.wait(); // counted
                if let Some(e) = failed {
                    return Err(e);
                }
                for (i, mut s) in held.into_iter().enumerate() {
                    let last = format!("{t}.{i} again\n");
                    s.write_all(last.as_bytes())
                        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
                        .map_err(|e| format!("connection {t}.{i}: {e}"))?;
                    let rest = read_to_eof(&mut s).map_err(|e| format!("{t}.{i}: {e}"))?;
                    if rest != last.as_bytes() {
                        return Err(format!("{t}.{i}: got {rest:?} at the end"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    barrier.wait();
    let running = children(worker).len() as u64;
    barrier.wait();
    let failures: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} client threads failed: {failures:?}; log:\n{}",
        failures.len(),
        d.log_text()
    );
    assert_eq!(
        running,
        want,
        "programs running at once on the worker; log:\n{}",
        d.log_text()
    );
    // Every program reaped: no zombie left behind.
    wait_for(DEADLINE, || children(worker).is_empty().then_some(()))
        .unwrap_or_else(|| panic!("programs left: {:?}", children(worker)));
    // One worker process, one loop: the programs had no thread each.
    let threads = std::fs::read_dir(format!("/proc/{worker}/task"))
        .unwrap()
        .count();
    assert!(threads < 10, "the worker has {threads} threads");
}

/// The program that prints its environment and working directory.
const ENV_SH: &str = "/usr/bin/env\necho \"CWD=$(pwd)\"\n";

fn parse_env(out: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Our uid, from /proc.
fn my_uid() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn ucspi_environment_in_async_mode() {
    let d = start_with(&[("env.sh", ENV_SH)], |dir| {
        exec_service(
            &[
                "tcp://127.0.0.1:0",
                &format!("unix:{}/x.sock", dir.display()),
            ],
            "",
            &format!(
                "command = [\"{}/env.sh\"]\ncwd = \"/tmp\"\nenv = {{ GREETING = \"hi there\", N = 7 }}",
                dir.display()
            ),
        )
    });
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    let mut s = connect(addr).unwrap();
    let env = parse_env(&read_to_eof(&mut s).unwrap());
    let me = s.local_addr().unwrap();
    assert_eq!(env["PROTO"], "TCP", "{env:?}");
    assert_eq!(env["TCPREMOTEIP"], me.ip().to_string());
    assert_eq!(env["TCPREMOTEPORT"], me.port().to_string());
    assert_eq!(env["TCPLOCALIP"], addr.ip().to_string());
    assert_eq!(env["TCPLOCALPORT"], addr.port().to_string());
    assert_eq!(env["PREFORKD_SERVICE"], "x");
    assert_eq!(env["GREETING"], "hi there");
    assert_eq!(env["N"], "7");
    assert_eq!(env["CWD"], "/tmp");
    assert!(env.contains_key("PATH"), "inherited: {env:?}");

    let sock = d.path("x.sock");
    let mut u = UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(DEADLINE)).unwrap();
    let env = parse_env(&read_to_eof(&mut u).unwrap());
    assert_eq!(env["PROTO"], "UNIX", "{env:?}");
    assert_eq!(env["UNIXLOCALPATH"], sock.display().to_string());
    assert_eq!(env["UNIXREMOTEPID"], std::process::id().to_string());
    assert_eq!(env["UNIXREMOTEEUID"], my_uid());
    assert_eq!(env["UNIXREMOTEUID"], my_uid());
    assert!(env.contains_key("UNIXREMOTEEGID") && env.contains_key("UNIXREMOTEGID"));
}

#[test]
fn timeout_kills_a_sleeping_program_and_what_it_double_forked() {
    // The subshell starts a sleep and exits: the sleep is nobody's child
    // here, only a member of the program's process group.
    let d = start_with(
        &[(
            "hang.sh",
            "(sleep 60 & echo \"bg $!\")\necho started\nsleep 60\n",
        )],
        |dir| {
            exec_service(
                &["tcp://127.0.0.1:0"],
                "workers = 1",
                &format!(
                    "command = [\"{}/hang.sh\"]\ntimeout = \"1s\"",
                    dir.display()
                ),
            )
        },
    );
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    let mut s = connect(addr).unwrap();
    let bg: i32 = read_line(&mut s)
        .unwrap()
        .strip_prefix("bg ")
        .expect("the pid of the double-forked sleep")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "started\n");
    assert!(alive(bg));
    // The loop serves others while the program hangs.
    let mut other = connect(addr).unwrap();
    let other_bg: i32 = read_line(&mut other)
        .unwrap()
        .strip_prefix("bg ")
        .expect("the pid of the other double-forked sleep")
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let line = d.wait_log("killed after its timeout");
    assert!(
        line.contains("exec x[pid ") && line.contains("SIGTERM"),
        "{line}"
    );
    // The other run ends at its own timeout, the same way (and so leaves
    // nothing behind when the test ends: killing the daemon would not
    // reach the program's sleeps, which are in a process group of their
    // own).
    let _ = read_to_eof(&mut other);
    for pid in [bg, other_bg] {
        wait_for(DEADLINE, || (!alive(pid)).then_some(()))
            .unwrap_or_else(|| panic!("the double-forked sleep {pid} outlived the timeout"));
    }
}

#[test]
fn stderr_reaches_the_log_and_a_flood_of_it_holds_neither_the_log_nor_the_loop() {
    let d = start_with(
        &[(
            "talk.sh",
            "read what\nif [ \"$what\" = flood ]; then exec yes flood >&2; fi\necho \"problem $what\" >&2\nprintf 'no newline' >&2\necho \"out $what\"\nexit 3\n",
        )],
        |dir| {
            exec_service(
                &["tcp://127.0.0.1:0"],
                "workers = 1",
                &format!(
                    "command = [\"{}/talk.sh\"]\ntimeout = \"2s\"",
                    dir.display()
                ),
            )
        },
    );
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    let mut flood = connect(addr).unwrap();
    flood.write_all(b"flood\n").unwrap();
    d.wait_log("]: flood");
    // Served on the same loop while the other program floods its stderr.
    let mut s = connect(addr).unwrap();
    s.write_all(b"one\n").unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"out one\n");
    let first = d.wait_log("]: problem one");
    let start = first.find("exec x[pid ").expect(&first) + "exec x[pid ".len();
    let pid: String = first[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    d.wait_log(&format!("exec x[pid {pid}]: no newline"));
    d.wait_log(&format!("exec x[pid {pid}]: exit status 3"));
    // The flood: killed at its timeout, its log capped.
    assert_eq!(read_to_eof(&mut flood).unwrap(), b"");
    d.wait_log("killed after its timeout");
    d.wait_log("stderr over 65536 bytes (");
    let logged = d.count_log("]: flood");
    assert!(
        logged <= 64 * 1024 / "flood\n".len(),
        "{logged} lines of the flood logged"
    );
}

/// A program that ignores TERM and holds its connection.
const STUBBORN: &str = "trap '' TERM\necho holding\nwhile :; do sleep 1; done\n";

#[test]
fn a_program_ignoring_term_is_killed_after_the_grace() {
    let d = start_with(&[("stubborn.sh", STUBBORN)], |dir| {
        exec_service(
            &["tcp://127.0.0.1:0"],
            "",
            &format!(
                "command = [\"{}/stubborn.sh\"]\ntimeout = \"1s\"",
                dir.display()
            ),
        )
    });
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "x")).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "holding\n");
    let t = Instant::now();
    let _ = read_to_eof(&mut s);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let line = d.wait_log("killed after its timeout");
    assert!(line.contains("SIGKILL"), "{line}");
}

#[test]
fn a_program_ignoring_the_stop_is_killed_at_graceful_timeout() {
    let mut d = start_with(&[("stubborn.sh", STUBBORN)], |dir| {
        exec_service(
            &["tcp://127.0.0.1:0"],
            "graceful_timeout = \"2s\"",
            &format!("command = [\"{}/stubborn.sh\"]", dir.display()),
        )
    });
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "x")).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "holding\n");
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(DEADLINE);
    let took = t.elapsed();
    let log = d.log_text();
    assert!(status.success(), "{status:?}; log:\n{log}");
    assert!(took < Duration::from_secs(6), "stop took {took:?}");
    assert!(
        log.contains("graceful_timeout after the worker was asked to stop"),
        "{log}"
    );
    assert!(
        !log.contains("still running at its stop deadline"),
        "the worker outlived graceful_timeout:\n{log}"
    );
    let _ = read_to_eof(&mut s);
}

#[test]
fn datagram_runs_answer_in_async_mode() {
    let d = start_with(&[], |dir| {
        exec_service(
            &[
                "udp://127.0.0.1:0",
                &format!("unixgram:{}/g.sock", dir.display()),
            ],
            "",
            "command = [\"tr\", \"a-z\", \"A-Z\"]",
        )
    });
    d.wait_ready();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(DEADLINE)).unwrap();
    let to = d.addr("udp", "x");
    // Several at once: each its own run, answered as it ends.
    for i in 0..8 {
        udp.send_to(format!("hello udp {i}").as_bytes(), to)
            .unwrap();
    }
    let mut buf = [0u8; 1024];
    let mut got: Vec<String> = (0..8)
        .map(|_| {
            let (n, _) = udp.recv_from(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .collect();
    got.sort();
    let want: Vec<String> = (0..8).map(|i| format!("HELLO UDP {i}")).collect();
    assert_eq!(got, want);

    let me = d.path("client.sock");
    let g = UnixDatagram::bind(&me).unwrap();
    g.set_read_timeout(Some(DEADLINE)).unwrap();
    g.send_to(b"hello unixgram", d.path("g.sock")).unwrap();
    let n = g.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HELLO UNIXGRAM");
}

#[test]
fn graceful_stop_lets_running_programs_finish_with_all_output_and_a_fin() {
    const N: usize = 20;
    // `read` takes one line, byte by byte: what follows it stays unread
    // in the socket when the program exits.
    let mut d = start_with(
        &[(
            "slow.sh",
            "echo started\nread l\nsleep 1\necho \"bye $l\"\necho done\n",
        )],
        |dir| {
            exec_service(
                &["tcp://127.0.0.1:0"],
                "workers = 1\ngraceful_timeout = \"15s\"",
                &format!("command = [\"{}/slow.sh\"]", dir.display()),
            )
        },
    );
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    let mut clients: Vec<TcpStream> = (0..N)
        .map(|_| {
            let mut s = connect(addr).unwrap();
            assert_eq!(read_line(&mut s).unwrap(), "started\n");
            s
        })
        .collect();
    d.signal(libc::SIGTERM);
    d.wait_log("graceful stop");
    for (i, s) in clients.iter_mut().enumerate() {
        // The line the program reads, and more it never reads.
        s.write_all(format!("{i}\nunread {i}\n").as_bytes())
            .unwrap();
    }
    for (i, s) in clients.iter_mut().enumerate() {
        // A reset would fail the read (ECONNRESET) or lose the output.
        let rest = read_to_eof(s).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(
            String::from_utf8_lossy(&rest),
            format!("bye {i}\ndone\n"),
            "client {i}"
        );
    }
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert!(status.success(), "{status:?}; log:\n{log}");
    assert!(!log.contains("killed"), "a program was killed:\n{log}");
    // Every server socket is closed now. A reset that came after the FIN
    // does not show in a read, but fails the next write (EPIPE); after a
    // clean close the write still succeeds (the reset it draws comes later).
    for (i, s) in clients.iter_mut().enumerate() {
        if let Err(e) = s.write_all(b"after the close") {
            panic!("client {i}: the connection was reset ({e}); log:\n{log}");
        }
    }
}

/// A TCP connection to `addr` from the loopback address `from`.
fn connect_from(from: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&local.into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Whether a connection from `from` is served: its line echoed by `cat`.
fn served_from(from: &str, addr: SocketAddr) -> bool {
    connect_from(from, addr).is_ok_and(|mut s| echo_line(&mut s, "knock\n").is_ok())
}

#[test]
fn deny_and_max_connections_per_ip_still_refuse_in_async_mode() {
    let d = Daemon::start(&cat_service(
        "workers = 1\ndeny = [\"127.0.0.2/32\"]\nmax_connections_per_ip = 1",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    // Refusals are counted in `status` (the log has at most a line a
    // second of them).
    let refused = |n: u64| {
        wait_status(&d, &format!("{n} refused"), |v| {
            status_workers(v, "x")[0]["refused"].as_u64() == Some(n)
        });
    };
    assert!(
        !served_from("127.0.0.2", addr),
        "a denied address was served"
    );
    d.wait_log("refused 127.0.0.2:");
    refused(1);
    let mut held = connect_from("127.0.0.1", addr).unwrap();
    echo_line(&mut held, "held\n").unwrap();
    assert!(
        !served_from("127.0.0.1", addr),
        "a second connection from 127.0.0.1 was served"
    );
    refused(2);
    assert!(served_from("127.0.0.3", addr), "{}", d.log_text());
    drop(held);
    wait_for(DEADLINE, || served_from("127.0.0.1", addr).then_some(()))
        .unwrap_or_else(|| panic!("127.0.0.1 still refused:\n{}", d.log_text()));
}

#[test]
fn programs_get_the_open_files_limit_the_master_started_with() {
    let (_, hard) = nofile();
    if hard <= 512 {
        eprintln!("skipped: the hard open files limit is {hard}, not above 512 (ulimit -Hn)");
        return;
    }
    let config = format!(
        "{HEAD}{}\n[service.handler.options]\ncommand = [\"sh\", \"-c\", \"ulimit -n\"]\n\n{}\n[service.handler.options]\ncommand = [\"sh\", \"-c\", \"ulimit -n\"]\n",
        service(
            "a",
            &["tcp://127.0.0.1:0"],
            "exec",
            "mode = \"async\"\nworkers = 1\nworker_connections = 16"
        ),
        service("t", &["tcp://127.0.0.1:0"], "exec", "workers = 1"),
    );
    let dir = tempdir();
    let path = dir.path().join("preforkd.toml");
    std::fs::write(&path, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    // Started with a soft limit of 512, which the master raises.
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -Sn 512 && exec \"$0\" -c \"$1\"")
        .arg(bin())
        .arg(&path);
    let d = Daemon::spawn(cmd, dir, &[]);
    d.wait_ready();
    d.wait_log("raised the open files limit from 512 to ");
    for w in d.wait_workers(2) {
        let (soft, hard) = nofile_of(w);
        assert_eq!(soft, hard, "worker {w} runs with the hard limit");
    }
    for svc in ["a", "t"] {
        let mut s = connect(d.addr("tcp", svc)).unwrap();
        let out = read_to_eof(&mut s).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "512\n",
            "service {svc}: the program's open files limit"
        );
    }
}
