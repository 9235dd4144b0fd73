//! The `exec` plugin, with the real binary: the UCSPI environment a program
//! sees over TCP and Unix sockets, its stderr in the log, its exit status,
//! `timeout`, datagram services, programs that cannot run (at start, on
//! reload, in `preforkd check`), programs that ignore the stop, and the
//! menu dialogue of docs/MENU.md as a shell program.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const HEAD: &str =
    "[daemon]\npid_file = \"{dir}/preforkd.pid\"\n\n[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// A config of one exec service; `options` go into its options table.
fn exec_service(listen: &[&str], extra: &str, options: &str) -> String {
    format!(
        "{HEAD}{}\n[service.handler.options]\n{options}\n",
        service("x", listen, "exec", extra)
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

/// The program that prints its environment and working directory.
const ENV_SH: &str = "/usr/bin/env\necho \"CWD=$(pwd)\"\n";

fn parse_env(out: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn ucspi_environment_over_tcp_with_env_and_cwd() {
    let d = start_with(&[("env.sh", ENV_SH)], |dir| {
        exec_service(
            &["tcp://127.0.0.1:0"],
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
    let out = read_to_eof(&mut s).unwrap();
    let env = parse_env(&out);
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
    assert!(
        env.contains_key("PATH"),
        "the environment is inherited: {env:?}"
    );
}

#[test]
fn ucspi_environment_over_unix_and_clear_env() {
    let d = start_with(&[("env.sh", ENV_SH)], |dir| {
        exec_service(
            &[&format!("unix:{}/x.sock", dir.display())],
            "",
            &format!(
                "command = [\"{}/env.sh\"]\nclear_env = true\nenv = {{ ONLY = \"this\" }}",
                dir.display()
            ),
        )
    });
    d.wait_ready();
    let sock = d.path("x.sock");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let out = read_to_eof(&mut s).unwrap();
    let env = parse_env(&out);
    assert_eq!(env["PROTO"], "UNIX", "{env:?}");
    assert_eq!(env["UNIXLOCALPATH"], sock.display().to_string());
    assert_eq!(env["UNIXREMOTEPID"], std::process::id().to_string());
    let uid = unsafe_free_uid();
    assert_eq!(env["UNIXREMOTEEUID"], uid);
    assert_eq!(env["UNIXREMOTEUID"], uid);
    assert!(env.contains_key("UNIXREMOTEEGID") && env.contains_key("UNIXREMOTEGID"));
    assert_eq!(env["ONLY"], "this");
    assert_eq!(env["PREFORKD_SERVICE"], "x");
    for gone in ["HOME", "PATH", "USER"] {
        assert!(
            !env.contains_key(gone),
            "{gone} survived clear_env: {env:?}"
        );
    }
}

/// Our uid, from /proc (no unsafe in tests for getuid).
fn unsafe_free_uid() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn stderr_and_exit_status_reach_the_log() {
    let d = start_with(
        &[(
            "fail.sh",
            "echo \"first problem\" >&2\nprintf 'second\\nno newline' >&2\necho out\nexit 3\n",
        )],
        |dir| {
            exec_service(
                &["tcp://127.0.0.1:0"],
                "",
                &format!("command = [\"{}/fail.sh\"]", dir.display()),
            )
        },
    );
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "x")).unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"out\n");
    let first = d.wait_log("]: first problem");
    let pid: String = {
        let start = first.find("exec x[pid ").expect(&first) + "exec x[pid ".len();
        first[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect()
    };
    assert!(!pid.is_empty(), "{first}");
    d.wait_log(&format!("exec x[pid {pid}]: second"));
    d.wait_log(&format!("exec x[pid {pid}]: no newline"));
    d.wait_log(&format!("exec x[pid {pid}]: exit status 3"));
}

#[test]
fn timeout_kills_a_hanging_program() {
    let d = start_with(&[("hang.sh", "echo started\nsleep 60\n")], |dir| {
        exec_service(
            &["tcp://127.0.0.1:0"],
            "",
            &format!(
                "command = [\"{}/hang.sh\"]\ntimeout = \"1s\"",
                dir.display()
            ),
        )
    });
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "x")).unwrap();
    let t = Instant::now();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"started\n");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let line = d.wait_log("killed after its timeout");
    assert!(
        line.contains("exec x[pid ") && line.contains("SIGTERM"),
        "{line}"
    );
    // The sleep, in the program's process group, died with it.
    let workers = d.workers();
    wait_for(DEADLINE, || {
        workers
            .iter()
            .all(|w| children(*w).is_empty())
            .then_some(())
    })
    .expect("the program's process group is still alive");
}

#[test]
fn datagram_services_reply_with_stdout() {
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
    udp.send_to(b"hello udp", d.addr("udp", "x")).unwrap();
    let mut buf = [0u8; 1024];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HELLO UDP");

    let me = d.path("client.sock");
    let g = UnixDatagram::bind(&me).unwrap();
    g.set_read_timeout(Some(DEADLINE)).unwrap();
    g.send_to(b"hello unixgram", d.path("g.sock")).unwrap();
    let n = g.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HELLO UNIXGRAM");
}

#[test]
fn missing_or_non_executable_program_is_refused_at_start() {
    for (what, reason) in [
        ("/nonexistent/prog", "No such file"),
        ("{dir}/plain.txt", "is not executable"),
    ] {
        let mut d = start_with(&[], |dir| {
            std::fs::write(dir.join("plain.txt"), "not a program\n").unwrap();
            exec_service(
                &["tcp://127.0.0.1:0"],
                "",
                &format!(
                    "command = [\"{}\"]",
                    what.replace("{dir}", &dir.display().to_string())
                ),
            )
        });
        let status = d.wait_exit(DEADLINE);
        let log = d.log_text();
        assert_eq!(
            status.code(),
            Some(preforkd::exit::code::CONFIG),
            "{what}: {status:?}; log:\n{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains("failed to boot") && l.contains(reason)),
            "{what}: no reason logged:\n{log}"
        );
    }
}

#[test]
fn reload_to_a_missing_program_is_refused_and_old_generation_serves() {
    let d = start_with(&[("hi.sh", "echo generation one\n")], |dir| {
        exec_service(
            &["tcp://127.0.0.1:0"],
            "",
            &format!("command = [\"{}/hi.sh\"]", dir.display()),
        )
    });
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    d.write_config(&exec_service(
        &["tcp://127.0.0.1:0"],
        "",
        "command = [\"{dir}/gone.sh\"]",
    ));
    let out = cli(&d, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("failed to boot") && err.contains("gone.sh"),
        "{err}"
    );
    let mut s = connect(addr).unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"generation one\n");
}

#[test]
fn check_names_a_missing_program_with_its_location() {
    let dir = tempdir();
    let path = dir.path().join("p.toml");
    let text = "[[service]]\nname = \"x\"\nlisten = [\"tcp://127.0.0.1:0\"]\n\n[service.handler]\nplugin = \"exec\"\n\n[service.handler.options]\ncommand = [\"/nonexistent/prog\"]\n";
    std::fs::write(&path, text).unwrap();
    let out = run_cli(&path, &["check"]);
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:6:10", path.display())) && err.contains("/nonexistent/prog"),
        "{err}"
    );
    // Unknown options too.
    std::fs::write(&path, format!("{text}colour = \"red\"\n")).unwrap();
    let out = run_cli(&path, &["check"]);
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(
        stderr(&out).contains("has no option \"colour\""),
        "{}",
        show(&out)
    );
}

/// A program that ignores TERM and holds its connection.
const STUBBORN: &str = "trap '' TERM\necho holding\nwhile :; do sleep 1; done\n";

#[test]
fn a_program_ignoring_the_stop_is_killed_at_graceful_timeout_on_stop() {
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
    assert!(status.success(), "{status:?}; log:\n{}", d.log_text());
    assert!(took < Duration::from_secs(6), "stop took {took:?}");
    assert!(
        d.log_text()
            .contains("graceful_timeout after the worker was asked to stop"),
        "{}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("still running at its stop deadline"),
        "the worker outlived graceful_timeout:\n{}",
        d.log_text()
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[test]
fn a_program_ignoring_the_stop_is_killed_at_graceful_timeout_on_reload() {
    let d = start_with(
        &[
            ("stubborn.sh", STUBBORN),
            ("two.sh", "echo generation two\n"),
        ],
        |dir| {
            exec_service(
                &["tcp://127.0.0.1:0"],
                "graceful_timeout = \"2s\"",
                &format!("command = [\"{}/stubborn.sh\"]", dir.display()),
            )
        },
    );
    d.wait_ready();
    let addr = d.addr("tcp", "x");
    let mut s = connect(addr).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "holding\n");
    d.write_config(&exec_service(
        &["tcp://127.0.0.1:0"],
        "graceful_timeout = \"2s\"",
        "command = [\"{dir}/two.sh\"]",
    ));
    let out = cli(&d, &["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let mut c = connect(addr).unwrap();
    assert_eq!(read_to_eof(&mut c).unwrap(), b"generation two\n");
    // The old connection ends: its program killed at graceful_timeout.
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    d.wait_log("graceful_timeout after the worker was asked to stop");
}

/// config/examples/menu-exec.toml with private addresses and the script's
/// absolute path.
fn menu_config() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("config/examples/menu-exec.toml")).unwrap();
    let replaced = shipped
        .replace("tcp://127.0.0.1:8010", "tcp://127.0.0.1:0")
        .replace("unix:/tmp/preforkd-menu.sock", "unix:{dir}/menu.sock")
        .replace(
            "\"examples/exec/menu.sh\"",
            &format!("\"{}\"", root.join("examples/exec/menu.sh").display()),
        );
    assert_eq!(replaced.matches("{dir}").count(), 1, "the example changed");
    assert!(!replaced.contains(":8010\"") && !replaced.contains("\"examples/"));
    // The options table is the file's last: English for menu_dialogue.
    format!("{replaced}env = {{ MENU_LANG = \"en\" }}\n")
}

#[test]
fn menu_example_passes_check_from_the_repo_root() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(bin())
        .args(["check", "-c", "config/examples/menu-exec.toml"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn menu_dialogue_over_tcp_and_unix() {
    let d = Daemon::start(&menu_config());
    d.wait_ready();
    menu_dialogue(connect(d.addr("tcp", "menu")).unwrap());
    menu_dialogue(connect_unix(&d.path("menu.sock")).unwrap());
    // The tutorial's client, in its own texts (the script's default).
    let zh = Daemon::start(&menu_config().replace("env = { MENU_LANG = \"en\" }\n", ""));
    zh.wait_ready();
    tutorial_client(connect(zh.addr("tcp", "menu")).unwrap());
    tutorial_client(connect_unix(&zh.path("menu.sock")).unwrap());
    // The client closing first: the program ends without another word.
    let mut s = connect(d.addr("tcp", "menu")).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_BANNER);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"");
    let _ = s.write_all(b"");
}

#[test]
fn a_program_starts_with_default_signals_and_dies_with_its_worker() {
    let d = start_with(&[("pid.sh", "echo $$\nexec sleep 60\n")], |dir| {
        exec_service(
            &[
                "tcp://127.0.0.1:0",
                &format!("unix:{}/sig.sock", dir.display()),
            ],
            "workers = 1",
            &format!("command = [\"{}/pid.sh\"]", dir.display()),
        )
    });
    d.wait_ready();
    // The worker ignores HUP, USR2, TTIN, TTOU and PIPE; the program must not.
    let sig = start_with(&[], |dir| {
        exec_service(
            &[&format!("unix:{}/s.sock", dir.display())],
            "",
            "command = [\"grep\", \"-E\", \"^Sig(Ign|Blk)\", \"/proc/self/status\"]",
        )
    });
    sig.wait_ready();
    let mut s = UnixStream::connect(sig.path("s.sock")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let text = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    let mask = |name: &str| {
        let line = text.lines().find(|l| l.starts_with(name)).expect(&text);
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(mask("SigBlk:"), 0, "{text}");
    let bit = |sig: i32| 1u64 << (sig - 1);
    let worker_ignored = [
        libc::SIGHUP,
        libc::SIGUSR2,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGPIPE,
    ]
    .into_iter()
    .map(bit)
    .fold(0, |a, b| a | b);
    assert_eq!(mask("SigIgn:") & worker_ignored, 0, "{text}");

    let mut c = connect(d.addr("tcp", "x")).unwrap();
    let pid: i32 = read_line(&mut c).unwrap().trim().parse().unwrap();
    assert!(alive(pid));
    let worker = d.wait_workers(1)[0];
    // SAFETY: kill(2) has no memory effects.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    wait_for(DEADLINE, || {
        (!alive(pid) || state(pid) == Some('Z')).then_some(())
    })
    .unwrap_or_else(|| panic!("program {pid} outlived its worker {worker}"));
}

/// The program owns the socket, so the worker reads TCP's own totals at
/// the connection's end: `status` (and /metrics) count what `cat` echoed.
#[test]
fn bytes_of_a_program_connection_are_counted() {
    let d = Daemon::start(&exec_service(
        &["tcp://127.0.0.1:0"],
        "workers = 1",
        "command = [\"/bin/cat\"]",
    ));
    d.wait_ready();
    const N: usize = 100_000;
    let mut s = connect(d.addr("tcp", "x")).unwrap();
    let payload = vec![b'p'; N];
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            s.write_all(&payload).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let echoed = read_to_eof(&mut s).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed.len(), N);
    drop(s);
    let v = wait_status(&d, "the connection's bytes", |v| {
        status_workers(v, "x")
            .iter()
            .any(|w| w["bytes_in"].as_u64() == Some(N as u64))
    });
    let w = status_workers(&v, "x")[0];
    assert_eq!(w["bytes_in"].as_u64(), Some(N as u64), "{w}");
    assert_eq!(w["bytes_out"].as_u64(), Some(N as u64), "{w}");
}
