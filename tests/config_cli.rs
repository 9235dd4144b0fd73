//! The command line and configuration errors, on the real binary: every
//! invalid config is one `FILE:LINE:COL: message` line and exit 78 before
//! anything is bound or forked; `check` and `print-config`; usage errors (64);
//! listeners that cannot be bound (69): a TCP port in use, a live Unix socket,
//! a path that is not a socket; a stale Unix socket file is replaced; the
//! embedded default.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// What a short-lived `preforkd` run left behind.
struct Outcome {
    /// The exit code (None: killed by a signal).
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// Every line of stdout and stderr.
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout:\n{}--- stderr:\n{}---",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A child in its own process group, SIGKILLed (group and all) on drop.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Runs `preforkd ARGS` in `dir` and waits (at most DEADLINE) for it to exit
/// by itself. stdout and stderr go to files in `dir` named after `label`, so a
/// child that hangs never blocks the test on a pipe.
fn preforkd(dir: &Path, label: &str, args: &[&str]) -> Outcome {
    let out = dir.join(format!("{label}.stdout"));
    let err = dir.join(format!("{label}.stderr"));
    let child = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .process_group(0)
        .spawn()
        .expect("spawn preforkd");
    let mut group = Group(child);
    let status = wait_for(DEADLINE, || group.0.try_wait().unwrap());
    let outcome = |code| Outcome {
        code,
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    };
    match status {
        Some(s) => outcome(s.code()),
        None => panic!(
            "preforkd {args:?} did not exit within {DEADLINE:?}\n{:?}",
            outcome(None)
        ),
    }
}

/// A fresh temp dir with `config` (`{dir}` replaced) written to `NAME`.
fn write_config(dir: &Path, name: &str, config: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, config.replace("{dir}", dir.to_str().unwrap())).unwrap();
    path
}

/// The one line a config error is: `preforkd: ` (the program's name, as in
/// every message it prints) then `FILE:LINE:COL: message`. Returns the message.
fn located_error(stderr: &str, file: &Path, line: usize, col: usize) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{stderr}"
    );
    let located = lines[0].strip_prefix("preforkd: ").unwrap_or(lines[0]);
    let want = format!("{}:{line}:{col}: ", file.display());
    let message = located
        .strip_prefix(&want)
        .unwrap_or_else(|| panic!("expected {want:?} at the start of {:?}", lines[0]));
    message.to_string()
}

/// An invalid config, both ways: `check -c FILE` and running `-c FILE` exit
/// 78 with one `FILE:LINE:COL: message` line containing `words`; running
/// binds and forks nothing.
fn rejects(config: &str, line: usize, col: usize, words: &[&str]) {
    rejects_where(config, line, |_| col, words);
}

/// [`rejects`], at the last `needle` in `line` (of the config as written,
/// `{dir}` replaced: the column depends on the temp dir's name).
fn rejects_at(config: &str, line: usize, needle: &str, words: &[&str]) {
    rejects_where(
        config,
        line,
        |text| {
            let l = text.lines().nth(line - 1).unwrap();
            l.rfind(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in {l:?}"))
                + 1
        },
        words,
    );
}

fn rejects_where(config: &str, line: usize, col: impl Fn(&str) -> usize, words: &[&str]) {
    let dir = tempdir();
    let file = write_config(dir.path(), "bad.toml", config);
    let path = file.to_str().unwrap();
    let col = col(&fs::read_to_string(&file).unwrap());

    let check = preforkd(dir.path(), "check", &["check", "-c", path]);
    assert_eq!(check.code, Some(78), "check -c {config}\n{check:?}");
    assert_eq!(
        check.stdout, "",
        "check printed a summary for an invalid config\n{check:?}"
    );
    let message = located_error(&check.stderr, &file, line, col);
    for w in words {
        assert!(message.contains(w), "{w:?} missing from {message:?}");
    }

    let run = preforkd(dir.path(), "run", &["-c", path]);
    assert_eq!(run.code, Some(78), "running -c {config}\n{run:?}");
    let all = run.all();
    assert!(!all.contains("listening on"), "bound a listener:\n{run:?}");
    assert!(!all.contains("spawned"), "forked a worker:\n{run:?}");
    assert_eq!(
        located_error(&run.stderr, &file, line, col),
        message,
        "running and check report differently"
    );
    // Nothing was bound: no socket file appeared in the dir.
    for entry in fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            !name.to_string_lossy().ends_with(".sock"),
            "{name:?} was created"
        );
    }
}

/// `[[service]]` "a" on a Unix socket in the temp dir, with `extra` keys.
fn one(extra: &str, plugin: &str) -> String {
    service("a", &["unix:{dir}/a.sock"], plugin, extra)
}

#[test]
fn unknown_key() {
    // Line 4 is `wrokers = 2`.
    rejects(
        &one("wrokers = 2", "echo"),
        4,
        1,
        &["unknown field `wrokers`", "expected one of", "`workers`"],
    );
}

#[test]
fn duplicate_service_name() {
    let config = [
        service("a", &["unix:{dir}/a.sock"], "echo", ""),
        service("a", &["unix:{dir}/b.sock"], "echo", ""),
    ]
    .join("");
    // The second `name = "a"`: line 8 (each service() is 6 lines plus the
    // empty `extra` line), column 8 (the string).
    rejects(&config, 8, 8, &["duplicate service name \"a\""]);
}

#[test]
fn duplicate_listen_address_across_services() {
    // A port the test holds, so that nothing could bind it anyway: the
    // config check must catch the duplicate before any bind (a bind would
    // exit 69, not 78).
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", held.local_addr().unwrap());
    let config = [
        service("a", &[&addr], "echo", ""),
        service("b", &["tcp://127.0.0.1:0", &addr], "echo", ""),
    ]
    .join("");
    // Line 9 is the second listen list; the duplicate is its second string
    // (port 0 is never a duplicate: each asks the kernel for a fresh port).
    let col = "listen = [\"tcp://127.0.0.1:0\", ".len() + 1;
    rejects(
        &config,
        9,
        col,
        &[
            &format!("duplicate listen address {addr}"),
            "already used by service \"a\"",
        ],
    );
}

#[test]
fn unix_and_unixgram_on_one_path_are_duplicates() {
    // One path is one socket file, whatever the socket type: a stream and a
    // datagram service cannot share it, and `dir//x` is `dir/x`. Caught by
    // the config check (78), before the first of them is bound.
    let config = [
        service("a", &["unix:{dir}/x.sock"], "echo", ""),
        service("b", &["unixgram:{dir}/x.sock"], "daytime", ""),
    ]
    .join("");
    rejects(
        &config,
        9,
        11,
        &[
            "duplicate listen address unixgram:",
            "already used by service \"a\"",
        ],
    );
    let config = service(
        "a",
        &["unix:{dir}/x.sock", "unix:{dir}//x.sock"],
        "echo",
        "",
    );
    rejects_at(
        &config,
        3,
        "\"unix:",
        &[
            "duplicate listen address unix:",
            "//x.sock",
            "already used by service \"a\"",
        ],
    );
}

#[test]
fn zero_workers() {
    rejects(
        &one("workers = 0", "echo"),
        4,
        11,
        &["workers = 0", "at least 1 worker"],
    );
}

#[test]
fn empty_listen() {
    let config = "[[service]]\nname = \"a\"\nlisten = []\n[service.handler]\nplugin = \"echo\"\n";
    rejects(
        config,
        3,
        10,
        &["service \"a\"", "listen is empty", "at least one address"],
    );
}

#[test]
fn unknown_plugin_lists_the_known_ones() {
    rejects(
        &one("", "ehco"),
        6,
        10,
        &[
            "unknown plugin \"ehco\"",
            "expected one of chargen, daytime, discard, dylib, echo",
        ],
    );
}

#[test]
fn invalid_listen_address() {
    let config = service("a", &["tcp://localhost:0"], "echo", "");
    rejects(
        &config,
        3,
        11,
        &[
            "invalid listen address \"tcp://localhost:0\"",
            "expected tcp://HOST:PORT",
        ],
    );
}

#[test]
fn toml_syntax_error() {
    // The array-of-tables header is not closed: `[[service]` on line 1.
    let config = "[[service]\nname = \"a\"\nlisten = [\"unix:{dir}/a.sock\"]\n";
    rejects(config, 1, 11, &["unclosed array table", "expected `]`"]);
}

#[test]
fn missing_config_file() {
    let dir = tempdir();
    let missing = dir.path().join("nowhere.toml");
    let path = missing.to_str().unwrap();
    for (label, args) in [
        ("check", vec!["check", "-c", path]),
        ("run", vec!["-c", path]),
    ] {
        let out = preforkd(dir.path(), label, &args);
        assert_eq!(out.code, Some(78), "{args:?}\n{out:?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{out:?}");
        assert!(lines[0].contains(path), "{out:?}");
        assert!(lines[0].contains("cannot read config file"), "{out:?}");
        assert!(lines[0].contains("No such file or directory"), "{out:?}");
        assert!(!out.all().contains("spawned"), "{out:?}");
        assert!(!out.all().contains("listening on"), "{out:?}");
    }
}

#[test]
fn check_and_print_config_on_a_valid_file() {
    let dir = tempdir();
    let config = [
        service("alpha", &["tcp://127.0.0.1:0"], "echo", "workers = 3"),
        service(
            "beta",
            &["unix:{dir}/beta.sock", "udp://127.0.0.1:0"],
            "daytime",
            "workers = 1\nthreads = 2",
        ),
    ]
    .join("\n");
    let file = write_config(dir.path(), "good.toml", &config);
    let path = file.to_str().unwrap();

    let check = preforkd(dir.path(), "check", &["check", "-c", path]);
    assert_eq!(check.code, Some(0), "{check:?}");
    assert!(check.stdout.contains("configuration is valid"), "{check:?}");
    assert!(
        check
            .stdout
            .contains("service alpha: plugin echo, 3 workers x 1 thread"),
        "{check:?}"
    );
    assert!(
        check
            .stdout
            .contains("service beta: plugin daytime, 1 worker x 2 threads"),
        "{check:?}"
    );
    assert!(!check.all().contains("spawned"), "{check:?}");
    assert!(
        !dir.path().join("beta.sock").exists(),
        "check bound the Unix socket"
    );

    let print = preforkd(dir.path(), "print", &["print-config", "-c", path]);
    assert_eq!(print.code, Some(0), "{print:?}");
    let text = &print.stdout;
    for line in [
        "name = \"alpha\"",
        "name = \"beta\"",
        "workers = 3",
        "threads = 1",
        "threads = 2",
        "graceful_timeout = \"30s\"",
        "ready_timeout = \"30s\"",
        "backlog = 1024",
        "max_requests = 0",
        "max_requests_jitter = 0",
        "socket_mode = \"0660\"",
        "level = \"info\"",
        "target = \"stderr\"",
        "plugin = \"daytime\"",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    // What print-config prints is itself a valid config, and printing it
    // again gives the same text.
    let printed = write_config(dir.path(), "printed.toml", text);
    let printed = printed.to_str().unwrap();
    let again = preforkd(dir.path(), "check2", &["check", "-c", printed]);
    assert_eq!(
        again.code,
        Some(0),
        "print-config output is not valid:\n{again:?}"
    );
    assert!(again.stdout.contains("service alpha"), "{again:?}");
    assert!(again.stdout.contains("service beta"), "{again:?}");
    let twice = preforkd(dir.path(), "print2", &["print-config", "-c", printed]);
    assert_eq!(twice.code, Some(0), "{twice:?}");
    assert_eq!(&twice.stdout, text, "print-config is not a fixed point");
}

#[test]
fn print_config_without_file_is_the_embedded_default() {
    let dir = tempdir();
    let out = preforkd(dir.path(), "print", &["print-config"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    for line in [
        "name = \"echo\"",
        "listen = [\"tcp://127.0.0.1:8009\"]",
        "workers = 2",
        "plugin = \"echo\"",
        "threads = 32",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "no line {line:?} in:\n{out:?}"
        );
    }
    assert_eq!(out.stdout.matches("[[service]]").count(), 1, "{out:?}");
    assert!(!out.all().contains("listening on"), "{out:?}");
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let dir = tempdir();
    let bogus = preforkd(dir.path(), "bogus", &["--bogus"]);
    assert_eq!(bogus.code, Some(64), "{bogus:?}");
    assert!(bogus.stderr.contains("--bogus"), "{bogus:?}");
    assert!(!bogus.all().contains("listening on"), "{bogus:?}");

    let frob = preforkd(dir.path(), "frob", &["frobnicate"]);
    assert_eq!(frob.code, Some(64), "{frob:?}");
    assert!(frob.stderr.contains("frobnicate"), "{frob:?}");
    assert!(!frob.all().contains("listening on"), "{frob:?}");

    let help = preforkd(dir.path(), "help", &["--help"]);
    assert_eq!(help.code, Some(0), "{help:?}");
    for word in ["Usage", "check", "print-config", "--config"] {
        assert!(
            help.stdout.contains(word),
            "{word:?} missing from --help\n{help:?}"
        );
    }
}

#[test]
fn port_in_use_exits_69_and_forks_nothing() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let mut d = Daemon::start(&service(
        "busy",
        &[&format!("tcp://{addr}")],
        "echo",
        "workers = 2",
    ));
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert_eq!(status.code(), Some(69), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("cannot listen on"))
        .unwrap_or_else(|| panic!("no `cannot listen on` line:\n{log}"));
    assert!(line.contains(&format!("tcp://{addr}")), "{line}");
    assert!(line.contains("Address already in use"), "{line}");
    assert!(!log.contains("spawned"), "a worker was forked:\n{log}");
    assert!(!log.contains("listening on"), "{log}");
    // The test's listener is untouched.
    drop(held);
}

#[test]
fn bind_failure_removes_the_socket_files_already_made() {
    // Service a binds its Unix socket, then service b cannot bind: a's file
    // must not stay behind (it would look like a stale socket next time).
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let config = [
        service("a", &["unix:{dir}/a.sock"], "echo", "workers = 1"),
        service(
            "b",
            &["unix:{dir}/b.sock", &format!("tcp://{addr}")],
            "echo",
            "workers = 1",
        ),
    ]
    .join("\n");
    let mut d = Daemon::start(&config);
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("Address already in use"), "{log}");
    assert!(!log.contains("spawned"), "a worker was forked:\n{log}");
    for name in ["a.sock", "b.sock"] {
        assert!(!d.path(name).exists(), "{name} left behind:\n{log}");
    }
}

#[test]
fn unwritable_pid_file_exits_73_and_removes_the_socket_files() {
    let config = format!(
        "[daemon]\npid_file = \"{{dir}}/no/such/dir/preforkd.pid\"\n{}",
        service("a", &["unix:{dir}/a.sock"], "echo", "workers = 1")
    );
    let mut d = Daemon::start(&config);
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert_eq!(status.code(), Some(73), "{log}");
    assert!(
        log.contains("cannot write pid file ") && log.contains("No such file or directory"),
        "{log}"
    );
    assert!(!log.contains("spawned"), "a worker was forked:\n{log}");
    assert!(!d.path("a.sock").exists(), "a.sock left behind:\n{log}");
}

/// preforkd exited 69 with a `cannot listen on` line that names `path` and
/// says `why`, without forking a worker.
fn bind_refused(d: &mut Daemon, path: &Path, why: &str) {
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert_eq!(status.code(), Some(69), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("cannot listen on"))
        .unwrap_or_else(|| panic!("no `cannot listen on` line:\n{log}"));
    assert!(line.contains(path.to_str().unwrap()), "{line}");
    assert!(line.contains(why), "{line}");
    assert!(!log.contains("spawned"), "a worker was forked:\n{log}");
}

#[test]
fn live_unix_socket_with_a_full_backlog_exits_69_at_once() {
    // A blocking connect() would wait for ever on this socket.
    let dir = tempdir();
    let path = dir.path().join("full.sock");
    let live = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    live.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
    live.listen(0).unwrap();
    let mut queued = Vec::new();
    loop {
        let c = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        c.set_nonblocking(true).unwrap();
        match c.connect(&socket2::SockAddr::unix(&path).unwrap()) {
            Ok(()) => queued.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(queued.len() < 64, "the backlog never filled");
    }
    let mut d = start_in(
        dir,
        &service("full", &["unix:{dir}/full.sock"], "echo", "workers = 1"),
    );
    bind_refused(&mut d, &path, "another server");
    drop(live);
}

/// Starts `preforkd -c` on `config` in a dir the test prepared.
fn start_in(dir: tempfile::TempDir, config: &str) -> Daemon {
    let file = write_config(dir.path(), "preforkd.toml", config);
    let mut cmd = Command::new(bin());
    cmd.arg("-c").arg(file);
    Daemon::spawn(cmd, dir, &[])
}

#[test]
fn stale_unix_socket_is_replaced() {
    let dir = tempdir();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale socket file should stay behind");
    assert_eq!(
        UnixStream::connect(&path).map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "nobody should be listening on the stale file"
    );

    let d = start_in(
        dir,
        &service("stale", &["unix:{dir}/stale.sock"], "echo", "workers = 1"),
    );
    d.wait_ready();
    d.wait_log("removing stale socket file");
    let mut s = UnixStream::connect(d.path("stale.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"over the old path\n").unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"over the old path\n");
}

#[test]
fn live_unix_socket_exits_69() {
    let dir = tempdir();
    let path = dir.path().join("live.sock");
    let live = UnixListener::bind(&path).unwrap();

    let mut d = start_in(
        dir,
        &service("live", &["unix:{dir}/live.sock"], "echo", "workers = 1"),
    );
    bind_refused(&mut d, &path, "another server");
    // The other server's socket is left alone and still answers.
    assert!(path.exists(), "the live socket file was removed");
    let _client = UnixStream::connect(&path).expect("the live socket no longer accepts");
    drop(live);
}

#[test]
fn regular_file_at_unix_path_exits_69_and_is_kept() {
    let dir = tempdir();
    let path = dir.path().join("file.sock");
    fs::write(&path, "precious\n").unwrap();

    let mut d = start_in(
        dir,
        &service("file", &["unix:{dir}/file.sock"], "echo", "workers = 1"),
    );
    bind_refused(&mut d, &path, "not a socket");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "precious\n",
        "the file was touched"
    );
}

#[test]
fn no_config_serves_the_embedded_default() {
    // This binds the fixed port 8009, which may be taken on a shared machine:
    // only the first log line is asserted (it is written before binding), and
    // the guard kills whatever happened after.
    let d = Daemon::spawn(Command::new(bin()), tempdir(), &[]);
    let first = wait_for(DEADLINE, || {
        let text = d.log_text();
        text.find('\n').map(|end| text[..end].to_string())
    })
    .unwrap_or_else(|| panic!("no log line; log:\n{}", d.log_text()));
    assert!(
        first.ends_with(
            "INFO: no --config given: serving the embedded default (echo on tcp://127.0.0.1:8009, 2 workers)"
        ),
        "first line: {first:?}"
    );
}
