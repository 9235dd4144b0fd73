//! Test support: run the real `preforkd` binary in a temp dir, in its own
//! process group that is SIGKILLed on drop (so a failing test never leaves a
//! daemon behind), and wait for conditions with deadlines instead of sleeps.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The default deadline for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_preforkd"))
}

/// A running preforkd. Dropping it kills its whole process group.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

/// A fresh temp dir (short path, so Unix socket paths fit in 108 bytes).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pfd")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

impl Daemon {
    /// Writes `config` (with `{dir}` replaced by the temp dir) to
    /// `preforkd.toml` and starts `preforkd -c` on it.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_bin(&bin(), config, &[])
    }

    /// The same with another binary (a test binary embedding preforkd) and
    /// extra environment.
    pub fn start_bin(bin: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempdir();
        let path = dir.path().join("preforkd.toml");
        fs::write(&path, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&path);
        Daemon::spawn(cmd, dir, env)
    }

    /// Starts `cmd` (already given its arguments) in `dir`.
    pub fn spawn(mut cmd: Command, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Daemon {
        let log = dir.path().join("preforkd.log");
        let err = fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(err.try_clone().unwrap())
            .stderr(err)
            .current_dir(dir.path())
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = spawn_retrying(&mut cmd);
        Daemon {
            child,
            dir,
            log,
            exited: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&self, needle: &str) -> String {
        let text = wait_for(DEADLINE, || {
            self.log_text()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_string)
        });
        text.unwrap_or_else(|| panic!("no log line with {needle:?}; log:\n{}", self.log_text()))
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until the first generation is ready.
    pub fn wait_ready(&self) {
        self.wait_log("INFO: ready: ");
    }

    /// The TCP (or UDP, with `scheme = "udp"`) address the service bound,
    /// from its `listening on` log line (the tests bind port 0).
    pub fn addr(&self, scheme: &str, service: &str) -> SocketAddr {
        let tail = format!("(service {service})");
        let line = self.wait_log(&format!("listening on {scheme}://"));
        let line = self
            .log_text()
            .lines()
            .find(|l| l.contains(&format!("listening on {scheme}://")) && l.ends_with(&tail))
            .map(str::to_string)
            .unwrap_or(line);
        let start = line.find("://").unwrap() + 3;
        let end = line.rfind(" (service").unwrap();
        line[start..end].parse().unwrap()
    }

    /// The master's children (its workers), from /proc.
    pub fn workers(&self) -> Vec<i32> {
        children(self.pid())
    }

    /// Waits until the master has exactly `n` children, none a zombie.
    pub fn wait_workers(&self, n: usize) -> Vec<i32> {
        wait_for(DEADLINE, || {
            let w = self.workers();
            (w.len() == n && w.iter().all(|p| state(*p).is_some_and(|s| s != 'Z'))).then_some(w)
        })
        .unwrap_or_else(|| {
            panic!(
                "expected {n} workers, have {:?}; log:\n{}",
                self.workers(),
                self.log_text()
            )
        })
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the master to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let status = wait_for(timeout, || self.child.try_wait().unwrap());
        let s =
            status.unwrap_or_else(|| panic!("preforkd did not exit; log:\n{}", self.log_text()));
        self.exited = Some(s);
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The whole group: master and workers, even if the master is gone.
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Polls `f` every 20 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children of `pid`, from /proc/PID/task/PID/children.
pub fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The state letter of a process (`R`, `S`, `Z`, ...), None if it is gone.
pub fn state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether a process exists (zombies count as gone).
pub fn alive(pid: i32) -> bool {
    state(pid).is_some_and(|s| s != 'Z')
}

/// The process title: /proc/PID/cmdline up to the first NUL.
pub fn title(pid: i32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let first = raw.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(first).into_owned()
}

/// Connects with a timeout on connect and on every read and write.
pub fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// [`connect`] for a Unix stream socket: the same timeouts on every read
/// and write.
pub fn connect_unix(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// One echo exchange on a new connection; Err describes what went wrong.
pub fn echo_once(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let mut s = connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != payload {
        return Err("mismatch".into());
    }
    Ok(())
}

/// Reads until EOF; Err on reset or timeout.
pub fn read_to_eof(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// A minimal config of one service; `extra` goes into its [[service]] table.
pub fn service(name: &str, listen: &[&str], plugin: &str, extra: &str) -> String {
    let listen: Vec<String> = listen.iter().map(|l| format!("{l:?}")).collect();
    format!(
        "[[service]]\nname = {name:?}\nlisten = [{}]\n{extra}\n[service.handler]\nplugin = {plugin:?}\n",
        listen.join(", ")
    )
}

/// Whether `[::1]` can be bound here.
pub fn have_ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

// ---------------------------------------------------------------------------
// Control CLI, status and config rewrites (reload and upgrade tests).

/// How long [`cli`] lets a `preforkd` command run before killing it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `preforkd -c DIR/preforkd.toml ARGS` (e.g. `["reload"]`,
/// `["status", "--json"]`) and returns its exit status and output. It is
/// SIGKILLed after [`CLI_TIMEOUT`] (its status then says so), so a command
/// that hangs never hangs the test.
pub fn cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    run_cli(&d.path("preforkd.toml"), args)
}

/// A command's exit status and output, for assertion messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "{}\n--- stdout:\n{}--- stderr:\n{}---",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A command's standard output, as text.
pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's standard error, as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `preforkd -c CONFIG status --json`, parsed; panics (with the log of
/// `d`) if it fails. For tests that keep several configs.
pub fn status_at(config: &Path, d: &Daemon) -> serde_json::Value {
    let out = run_cli(config, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}; log:\n{}",
        show(&out),
        d.log_text()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", show(&out)))
}

/// `preforkd status --json` with the daemon's own config, parsed.
pub fn status(d: &Daemon) -> serde_json::Value {
    status_at(&d.path("preforkd.toml"), d)
}

/// Polls [`status_at`] until `f` accepts it; returns that status. Panics
/// after [`DEADLINE`], saying `what` it waited for.
pub fn wait_status_at(
    config: &Path,
    d: &Daemon,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for(DEADLINE, || {
        last = status_at(config, d);
        f(&last).then(|| last.clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "status never showed {what}; last status:\n{last:#}\nlog:\n{}",
            d.log_text()
        )
    })
}

/// [`wait_status_at`] with the daemon's own config.
pub fn wait_status(
    d: &Daemon,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_status_at(&d.path("preforkd.toml"), d, what, f)
}

/// Whether a status document shows a master at rest: running, no reload or
/// upgrade in progress or pending, and every service with exactly its size
/// of workers, all of the current generation and all ready (idle or busy).
pub fn settled(v: &serde_json::Value) -> bool {
    let generation = &v["generation"];
    let Some(services) = v["services"].as_array() else {
        return false;
    };
    v["state"] == "running"
        && v["reload"]["in_progress"].is_null()
        && v["reload"]["pending"] == false
        && v["upgrade"]["in_progress"].is_null()
        && v["upgrade"]["pending"] == false
        && services.iter().all(|s| {
            let workers = s["workers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            s["size"].as_u64() == Some(workers.len() as u64)
                && workers.iter().all(|w| {
                    &w["generation"] == generation && (w["state"] == "idle" || w["state"] == "busy")
                })
        })
}

/// Waits until [`settled`]; returns that status. Panics after [`DEADLINE`].
pub fn wait_settled(d: &Daemon) -> serde_json::Value {
    wait_status(d, "the master settled", settled)
}

/// The workers of `service` in a status document.
pub fn status_workers<'a>(v: &'a serde_json::Value, service: &str) -> Vec<&'a serde_json::Value> {
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["workers"].as_array().into_iter().flatten())
        .collect()
}

/// The pid in the pid file (the current master, also after an upgrade).
pub fn pid_file_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Daemon {
    /// Replaces the config file (`{dir}` replaced by the temp dir), whole:
    /// written to a temporary name and renamed, so that a reload never reads
    /// half of it.
    pub fn write_config(&self, config: &str) {
        let path = self.path("preforkd.toml");
        let tmp = self.path("preforkd.toml.tmp");
        fs::write(
            &tmp,
            config.replace("{dir}", self.dir.path().to_str().unwrap()),
        )
        .unwrap();
        fs::rename(&tmp, &path).unwrap();
    }
}

/// Runs `preforkd -c CONFIG ARGS` for tests that keep several configs
/// ([`cli`] uses the daemon's own), as `uid` (and the same gid) if given.
/// Runs `preforkd -c CONFIG ARGS`, as `uid` (and the same gid) if given,
/// and returns its output and pid. The command is killed (and the test
/// fails) if it is still running after [`CLI_TIMEOUT`]. Output goes to
/// anonymous files, so a chatty command never blocks on a full pipe.
pub fn run_cli_as(config: &Path, args: &[&str], uid: Option<u32>) -> (std::process::Output, u32) {
    let out = tempfile::tempfile().expect("tempfile");
    let err = tempfile::tempfile().expect("tempfile");
    let mut cmd = Command::new(bin());
    cmd.arg("-c")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    if let Some(id) = uid {
        cmd.uid(id).gid(id);
    }
    let mut child = spawn_retrying(&mut cmd);
    let pid = child.id();
    let end = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for preforkd") {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`preforkd {}` still running after {CLI_TIMEOUT:?}: killed it; stdout: {:?}, stderr: {:?}",
                args.join(" "),
                read_all(out),
                read_all(err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = std::process::Output {
        status,
        stdout: read_all(out).into_bytes(),
        stderr: read_all(err).into_bytes(),
    };
    (output, pid)
}

pub fn run_cli(config: &Path, args: &[&str]) -> std::process::Output {
    run_cli_as(config, args, None).0
}

fn read_all(mut f: fs::File) -> String {
    use std::io::Seek;
    let mut s = String::new();
    let _ = f.rewind();
    let _ = f.read_to_string(&mut s);
    s
}

/// Spawns `cmd`, retrying on ETXTBSY: a test that writes an executable
/// (a copied binary, a wrapper script) races the forks of other test
/// threads, whose children hold the file's write descriptor until they
/// exec. Any other error fails the test.
pub fn spawn_retrying(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {cmd:?}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The menu dialogue of docs/MENU.md, one checker for every implementation.
// The tests run it in English (`language = "en"`), and the tutorial's own
// client against the default texts (`tutorial_client`).

pub const MENU_BANNER: &str =
    "Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.\n";
pub const MENU_OPERATOR: &str = "Your call is being transferred to an operator.\n";
pub const MENU_AGAIN: &str =
    "Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.\n";
pub const MENU_GOODBYE: &str = "Goodbye.\n";

/// Reads one `\n`-terminated line, byte by byte (nothing read past it).
pub fn read_line(s: &mut impl Read) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b)? == 0 {
            break;
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Runs docs/MENU.md's transcript, plus a `\r\n` choice with spaces and
/// pipelined choices, then checks the server closes after `Goodbye.`.
pub fn menu_dialogue<S: Read + Write>(mut s: S) {
    assert_eq!(read_line(&mut s).unwrap(), MENU_BANNER);
    for (send, expect) in [
        ("hello\n", MENU_AGAIN),
        ("0\n", MENU_OPERATOR),
        ("  0 \r\n", MENU_OPERATOR),
        ("\n", MENU_AGAIN),
        ("00\n", MENU_AGAIN),
    ] {
        s.write_all(send.as_bytes()).unwrap();
        assert_eq!(read_line(&mut s).unwrap(), expect, "answer to {send:?}");
    }
    // Two choices in one write, the second with no newline: what the read
    // delivered after the last newline is a choice too (the tutorial's
    // client sends no newline).
    s.write_all(b"0\nhello").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_OPERATOR);
    assert_eq!(read_line(&mut s).unwrap(), MENU_AGAIN);
    s.write_all(b"exit").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_GOODBYE);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "more after Goodbye: {rest:?}");
}

/// The socketserver tutorial's client, ported as it is: it reads what one
/// `recv(1024)` returns, sends each choice with one `sendall` and no
/// newline, and reads the answer with one `recv(1024)`. Checks the
/// tutorial's texts (the default), then `exit` closes the connection.
pub fn tutorial_client<S: Read + Write>(mut s: S) {
    let recv = |s: &mut S| {
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    assert_eq!(recv(&mut s), "欢迎致电 10086,请输入1xxx,0转人工服务.\n");
    for (choice, answer) in [
        ("0", "通过可能会被录音.balabala一大推\n"),
        ("1234", "请重新输入.\n"),
        ("0", "通过可能会被录音.balabala一大推\n"),
    ] {
        s.write_all(choice.as_bytes()).unwrap();
        assert_eq!(recv(&mut s), answer, "answer to {choice:?}");
    }
    s.write_all(b"exit").unwrap();
    assert_eq!(recv(&mut s), "", "exit closes the connection");
}

// ---------------------------------------------------------------------------
// The runner of the `harness = false` test binaries (the ones that embed
// preforkd with test plugins, and so need their own `main`).

/// Runs `tests` like libtest: arguments that are not options filter them by
/// name; a panic fails the test (its whole message, with the daemon's log,
/// went to stderr through the panic hook; one line is printed here). Exits 1
/// if any failed.
pub fn run_tests(tests: &[(&str, fn())]) {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in selected {
        match catch_unwind(AssertUnwindSafe(test)) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Err(payload) => {
                failed += 1;
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                let first = msg.lines().next().unwrap_or_default();
                println!("test {name} ... FAILED: {first}");
            }
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

/// strace, if it is installed and may trace here (ptrace can be forbidden
/// in a restricted container).
pub fn strace() -> Option<std::path::PathBuf> {
    let out = Command::new("which").arg("strace").output().ok()?;
    let path: std::path::PathBuf = String::from_utf8_lossy(&out.stdout).trim().into();
    let works = Command::new(&path)
        .args(["-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success());
    (out.status.success() && works).then_some(path)
}

/// Writes an executable shell script (`body` after `#!/bin/sh`) into `dir`,
/// whole or not at all (written aside, then renamed); returns its path.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, format!("#!/bin/sh\n{body}")).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, &path).unwrap();
    path
}

/// The pid in a `worker NAME (pid N)...` log line.
pub fn pid_in(line: &str) -> i32 {
    let start = line.find("(pid ").unwrap() + 5;
    let end = start + line[start..].find(')').unwrap();
    line[start..end].parse().unwrap()
}

/// Samples, in a thread until finished, the fewest ready (idle or busy)
/// workers of `service` that `status` showed, and how many samples.
pub struct ReadySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    min: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    samples: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReadySampler {
    pub fn start(d: &Daemon, service: &'static str) -> ReadySampler {
        let config = d.path("preforkd.toml");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let min = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        let samples = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, m, n) = (stop.clone(), min.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let out = run_cli(&config, &["status", "--json"]);
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    let ready = status_workers(&v, service)
                        .iter()
                        .filter(|w| w["state"] == "idle" || w["state"] == "busy")
                        .count();
                    m.fetch_min(ready, std::sync::atomic::Ordering::SeqCst);
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                // Pacing, not synchronisation: a sample every 50 ms is
                // plenty and leaves the 2 cores to the test.
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        ReadySampler {
            stop,
            min,
            samples,
            thread: Some(thread),
        }
    }

    /// Stops sampling; (fewest ready, samples).
    pub fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.min.load(std::sync::atomic::Ordering::SeqCst),
            self.samples.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

impl Drop for ReadySampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Checks, for every recycled worker in the log, that its replacement was
/// ready before it was asked to stop (and so before it exited); returns how
/// many were.
pub fn replaced_first(log: &str) -> usize {
    let lines: Vec<&str> = log.lines().collect();
    let mut n = 0;
    for (i, l) in lines.iter().enumerate() {
        if !l.contains("): replaced by ") {
            continue;
        }
        n += 1;
        let old = pid_in(l);
        let new_pid = pid_in(&l[l.find("replaced by ").unwrap()..]);
        let ready = lines
            .iter()
            .position(|x| x.contains(&format!("(pid {new_pid}) ready")))
            .unwrap_or_else(|| panic!("replacement {new_pid} never ready:\n{log}"));
        let exited = lines
            .iter()
            .position(|x| x.contains(&format!("(pid {old}) exited")))
            .unwrap_or(usize::MAX);
        assert!(
            ready < i && i < exited,
            "worker {old}: replacement {new_pid} ready at line {ready}, stop at {i}, exit at {exited}:\n{log}"
        );
    }
    n
}

/// Bytes waiting in a socket's receive buffer (FIONREAD), without reading.
pub fn pending(s: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(s), libc::FIONREAD, &mut n) };
    assert_eq!(
        rc,
        0,
        "ioctl(FIONREAD): {}",
        std::io::Error::last_os_error()
    );
    n as usize
}

/// Sends `payload` from a socket bound to `from` and returns the answer,
/// sending again while none comes (UDP may drop), within the deadline.
pub fn udp_ask(to: SocketAddr, from: &str, payload: &[u8]) -> Vec<u8> {
    let s = std::net::UdpSocket::bind(from).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    wait_for(DEADLINE, || {
        s.send_to(payload, to).ok()?;
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    })
    .unwrap_or_else(|| panic!("no answer from udp://{to}"))
}

/// A TCP port free on 127.0.0.1 right now: bound, then released, for a
/// program that takes no port 0 (HAProxy, systemd-socket-activate, a
/// container's own config). Whoever binds it next may race another
/// process; the callers retry or the window is short.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `METHOD url` over HTTP/1.0: (HTTP status, headers, body).
pub fn http(method: &str, url: &str) -> (u16, String, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut s =
        connect(hostport.parse().unwrap()).unwrap_or_else(|e| panic!("connect {hostport}: {e}"));
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let reply = String::from_utf8(read_to_eof(&mut s).unwrap()).unwrap();
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {url}: no header end in {reply:?}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {url}: bad status line in {head:?}"));
    (code, head.to_string(), body.to_string())
}

/// The address the metrics endpoint bound, from the log.
pub fn metrics_url(d: &Daemon) -> String {
    let line = d.wait_log("metrics: serving http://");
    let start = line.find("http://").unwrap();
    line[start..].trim().to_string()
}
