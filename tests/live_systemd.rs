//! The Debian package under a real systemd: a Debian 12 root (debootstrap,
//! cached under target/) booted with systemd-nspawn, the .deb installed,
//! driven and purged with dpkg and systemctl through nsenter, and served
//! from the host over loopback (the container shares the host's network).
//!
//! Checked against the live service manager: install (user, start after
//! READY=1, StatusText, echo), synchronous reload (good and broken
//! config, the journal's file:line:col), journald priorities and worker
//! pids, the security score and the workers' credentials, the watchdog
//! (pinged; a SIGSTOPped master is restarted), `preforkd upgrade` and
//! SIGUSR2 (MainPID follows) then stop (nothing left), socket activation
//! across a restart (nothing refused), a package upgrade under client load
//! (a hot binary upgrade: no failed request), and purge.
//!
//! The .debs come from packaging/live-systemd.sh (PREFORKD_LIVE_DEB, the
//! package; PREFORKD_LIVE_DEB_NEXT, the same with a higher version); without
//! them, or without root, debootstrap, systemd-nspawn or nsenter, or where
//! the container does not boot, the test is skipped with one line saying
//! why. Whatever happens, the container is killed and its root, cgroup
//! directories and nspawn's run-time directory are removed (`Container`'s
//! Drop).

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{free_port, wait_for};

/// Bumped when the root's recipe changes, so that a cached root is rebuilt.
const ROOT_STAMP: &str = "bookworm-minbase-1";
const ROOT_PACKAGES: &str = "systemd,systemd-sysv,dbus,adduser,procps";
/// Boot, journal flushes, restarts: generous, since CI's 2 cores are shared.
const DEADLINE: Duration = Duration::from_secs(60);
/// The whole test; each command inside the container is bounded too.
const COMMAND_TIMEOUT: &str = "180";
/// The unit and config as the package installs them.
const CONFIG: &str = "/etc/preforkd/preforkd.toml";
/// The ceiling for the unit's `systemd-analyze security` score in the
/// container (docs/OPERATIONS.md records 2.5).
const MAX_EXPOSURE: f64 = 2.6;

fn skip(why: &str) {
    println!("SKIP live_systemd: {why}");
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Debian mirror apt uses for bookworm (deb822 or one-line sources).
fn mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        // deb822: a stanza with URIs: and Suites: naming bookworm.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:"))
                && suites.split_whitespace().any(|s| s == "bookworm")
            {
                return uris.split_whitespace().next().map(str::to_string);
            }
        }
        // One-line: deb [options] URI SUITE COMPONENTS...
        for line in text.lines() {
            let words: Vec<&str> = line
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            if words.len() >= 3 && words[0] == "deb" && words[2] == "bookworm" {
                return Some(words[1].to_string());
            }
        }
    }
    None
}

fn tmpdir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// The cached root (made once per ROOT_STAMP; about 40 s), or why not.
fn cached_root() -> Result<PathBuf, String> {
    let root = tmpdir().join(format!("nspawn-root-{ROOT_STAMP}"));
    if root.join("usr/lib/systemd/systemd").exists() {
        return Ok(root);
    }
    let mirror = mirror().ok_or("no bookworm mirror in /etc/apt/sources.list*")?;
    let partial = tmpdir().join(format!("nspawn-root-{ROOT_STAMP}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let started = Instant::now();
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={ROOT_PACKAGES}")])
        .args(["bookworm".as_ref(), partial.as_os_str(), mirror.as_ref()])
        .output()
        .map_err(|e| format!("cannot run debootstrap: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "debootstrap failed ({}): {}",
            out.status,
            err.lines().last().unwrap_or("")
        ));
    }
    std::fs::rename(&partial, &root).map_err(|e| format!("cannot rename the root: {e}"))?;
    println!("debootstrap: {:.0} s", started.elapsed().as_secs_f64());
    Ok(root)
}

/// The cgroup directories nspawn makes under this process's cgroup, in
/// each hierarchy it uses (named systemd v1, and the unified one).
fn cgroup_dirs() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let base = match controllers {
            Some("name=systemd") => "/sys/fs/cgroup/systemd",
            Some("") => "/sys/fs/cgroup/unified",
            _ => continue,
        };
        let base = Path::new(base).join(path.unwrap_or("/").trim_start_matches('/'));
        for d in ["payload", "supervisor"] {
            dirs.push(base.join(d));
        }
    }
    dirs
}

/// Removes a cgroup tree, deepest first; false if a directory stays (it
/// still has processes).
fn remove_cgroup(dir: &Path) -> bool {
    if !dir.exists() {
        return true;
    }
    let mut subdirs: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        subdirs.push(d);
    }
    for d in subdirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
    !dir.exists()
}

/// Removes the roots of earlier runs that were killed before their Drop
/// (named after the test process's pid: those whose process is gone).
fn remove_stale_roots() {
    let Ok(dir) = std::fs::read_dir(tmpdir()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("preforkd-live-")
            .map(|p| p.trim_end_matches(".console"))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A booted container; Drop kills it and removes all it left.
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), in the host's pid namespace.
    leader: i32,
    root: PathBuf,
    cgroups: Vec<PathBuf>,
}

impl Container {
    /// Copies the cached root and boots it; Err(why) to skip.
    fn boot(cache: &Path, name: &str, prepare: impl FnOnce(&Path)) -> Result<Container, String> {
        remove_stale_roots();
        let cgroups = cgroup_dirs();
        for d in &cgroups {
            if !remove_cgroup(d) {
                return Err(format!(
                    "{} has processes: another container runs here",
                    d.display()
                ));
            }
        }
        let root = tmpdir().join(name);
        let _ = std::fs::remove_dir_all(&root);
        let cp = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(cache)
            .arg(&root)
            .status()
            .map_err(|e| format!("cannot run cp: {e}"))?;
        if !cp.success() {
            let _ = std::fs::remove_dir_all(&root);
            return Err(format!(
                "cannot copy {} to {}",
                cache.display(),
                root.display()
            ));
        }
        prepare(&root);
        let log = std::fs::File::create(root.with_extension("console"))
            .map_err(|e| format!("cannot create the console log: {e}"))?;
        let started = Instant::now();
        // Without a host systemd, nspawn must neither register with machined
        // nor ask for a scope unit (--register=no --keep-unit), and needs
        // SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 on this hybrid cgroup layout.
        let nspawn = Command::new("systemd-nspawn")
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .args(["-q", "-b", "--register=no", "--keep-unit", "--console=pipe"])
            .arg("-D")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run systemd-nspawn: {e}"))?;
        let mut c = Container {
            nspawn,
            leader: 0,
            root,
            cgroups,
        };
        let pid = c.nspawn.id();
        let leader = wait_for(DEADLINE, || {
            if let Ok(Some(_)) = c.nspawn.try_wait() {
                return Some(None);
            }
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            kids.split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok())
                .find(|k| {
                    std::fs::read_to_string(format!("/proc/{k}/comm"))
                        .is_ok_and(|c| c.trim() == "systemd")
                })
                .map(Some)
        })
        .flatten();
        let Some(leader) = leader else {
            return Err(format!(
                "systemd-nspawn did not start systemd: {}",
                c.console_last_line()
            ));
        };
        c.leader = leader;
        let state = wait_for(DEADLINE, || {
            let s = c.sh("systemctl is-system-running");
            let s = stdout(&s);
            (s == "running" || s == "degraded").then_some(s)
        });
        match state {
            Some(s) => {
                println!("boot: {} in {:.2} s", s, started.elapsed().as_secs_f64());
                Ok(c)
            }
            None => Err(format!(
                "the container did not finish booting in {DEADLINE:?}: {}",
                c.console_last_line()
            )),
        }
    }

    /// The last line nspawn or the container printed, for a skip message.
    fn console_last_line(&self) -> String {
        let text = std::fs::read_to_string(self.root.with_extension("console")).unwrap_or_default();
        text.lines().last().unwrap_or("(no output)").to_string()
    }

    /// Runs a shell script inside the container (all its namespaces), with
    /// a clean environment and a time limit.
    fn sh(&self, script: &str) -> Output {
        Command::new("timeout")
            .args([
                COMMAND_TIMEOUT,
                "nsenter",
                "-t",
                &self.leader.to_string(),
                "-a",
            ])
            .args(["/bin/sh", "-c", script])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run nsenter")
    }

    /// Like `sh`, and the script must succeed; returns its standard output.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}\n{}",
            show(&out)
        );
        stdout(&out)
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    fn prop(&self, unit: &str, name: &str) -> String {
        self.ok(&format!("systemctl show -p {name} --value {unit}"))
    }

    fn main_pid(&self) -> i32 {
        self.prop("preforkd.service", "MainPID").parse().unwrap()
    }

    /// Writes a file into the container's root (as root, from the host).
    fn write(&self, path: &str, text: &str) {
        let p = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }

    /// Waits until the journal has a line of preforkd.service containing
    /// `needle` (journald writes asynchronously); returns the whole output.
    fn wait_journal(&self, args: &str, needle: &str) -> String {
        let mut last = String::new();
        wait_for(DEADLINE, || {
            last = self.ok(&format!("journalctl -u preforkd --no-pager -o cat {args}"));
            last.contains(needle).then_some(())
        })
        .unwrap_or_else(|| panic!("no journal line with {needle:?} ({args}):\n{last}"));
        last
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() && self.leader > 0 {
            let out = self.sh("journalctl --no-pager -n 80 -o short-monotonic");
            eprintln!("the container's journal, last lines:\n{}", stdout(&out));
        }
        // SIGKILL to the container's PID 1 ends its whole pid namespace;
        // then nspawn exits.
        if self.leader > 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.leader.to_string()])
                .status();
        }
        let gone = wait_for(Duration::from_secs(10), || {
            self.nspawn.try_wait().ok().flatten()
        });
        if gone.is_none() {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        // nspawn's mounts live in its own mount namespace; any that leaked
        // into ours (none expected) would pin the root.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.root.to_string_lossy().to_string();
        let mut leaked: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        leaked.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in leaked {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for d in &self.cgroups {
            if wait_for(Duration::from_secs(10), || remove_cgroup(d).then_some(())).is_none() {
                eprintln!(
                    "live_systemd: cannot remove {}: processes left",
                    d.display()
                );
            }
        }
        let console = self.root.with_extension("console");
        if thread::panicking() {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!("the container's console, last lines:");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_file(&console);
        let name = self.root.file_name().unwrap_or_default();
        let _ = std::fs::remove_dir(Path::new("/run/systemd/nspawn/propagate").join(name));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn show(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One echo exchange on a new connection.
fn echo(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    exchange(&mut s, b"ping\n").map_err(|k| k.to_string())
}

/// How a request failed, for the client loops' counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Refused,
    Reset,
    Timeout,
    /// The connection closed before the whole answer came.
    EarlyEof,
    Mismatch,
    Other,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

fn kind(e: &std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            Failure::Reset
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::Timeout,
        ErrorKind::UnexpectedEof => Failure::EarlyEof,
        _ => Failure::Other,
    }
}

/// Sends `payload`, reads the echo back; Err(EarlyEof) with nothing read
/// is told apart by the caller through `got_nothing`.
fn exchange(s: &mut TcpStream, payload: &[u8]) -> Result<(), Failure> {
    s.write_all(payload).map_err(|e| kind(&e))?;
    let mut got = vec![0; payload.len()];
    let mut n = 0;
    while n < got.len() {
        match s.read(&mut got[n..]) {
            Ok(0) if n == 0 => return Err(Failure::EarlyEof),
            Ok(0) => return Err(Failure::Mismatch),
            Ok(k) => n += k,
            Err(e) => return Err(kind(&e)),
        }
    }
    if got == payload {
        Ok(())
    } else {
        Err(Failure::Mismatch)
    }
}

/// What a client loop saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: BTreeMap<Failure, u64>,
    /// rr: the server closed a kept-alive connection at a request boundary
    /// (FIN before our next request, as a retiring worker does): the
    /// request went again on a new connection, as HTTP clients do.
    reconnects: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.reconnects += other.reconnects;
        for (k, v) in other.failed {
            *self.failed.entry(k).or_default() += v;
        }
    }
    fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream, Failure> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| kind(&e))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    Ok(s)
}

/// Client loops until `stop` (at most `MAX_REQUESTS` each): `rr` clients
/// keep one connection and send request after request; `connect` clients
/// open a connection per request.
fn load(
    addr: SocketAddr,
    rr: usize,
    conn: usize,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
) -> Vec<thread::JoinHandle<Tally>> {
    // Bounds, in count and time, whatever `stop` does.
    const MAX_REQUESTS: u64 = 5_000_000;
    const MAX_TIME: Duration = Duration::from_secs(240);
    let mut handles = Vec::new();
    for i in 0..rr + conn {
        let stop = stop.clone();
        let served = served.clone();
        let keep = i < rr;
        handles.push(thread::spawn(move || {
            let mut t = Tally::default();
            let mut kept: Option<TcpStream> = None;
            let mut n = 0u64;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && n < MAX_REQUESTS && start.elapsed() < MAX_TIME {
                n += 1;
                let payload = format!("client {i} request {n}\n");
                let reused = kept.is_some();
                let stream = match kept.take() {
                    Some(s) => Ok(s),
                    None => connect(addr),
                };
                let result =
                    stream.and_then(|mut s| exchange(&mut s, payload.as_bytes()).map(|()| s));
                let result = match result {
                    Err(Failure::EarlyEof) if reused => {
                        t.reconnects += 1;
                        connect(addr)
                            .and_then(|mut s| exchange(&mut s, payload.as_bytes()).map(|()| s))
                    }
                    r => r,
                };
                match result {
                    Ok(s) => {
                        t.ok += 1;
                        served.fetch_add(1, Ordering::Relaxed);
                        if keep {
                            kept = Some(s);
                        }
                    }
                    Err(f) => *t.failed.entry(f).or_default() += 1,
                }
            }
            t
        }));
    }
    handles
}

fn tally(handles: Vec<thread::JoinHandle<Tally>>) -> Tally {
    let mut t = Tally::default();
    for h in handles {
        t.add(h.join().unwrap());
    }
    t
}

/// Runs `during` while client loops run: from when they have been served
/// a few requests each until a few more after it; returns what they saw.
fn under_load(addr: SocketAddr, during: impl FnOnce()) -> Tally {
    const CLIENTS: usize = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let handles = load(addr, CLIENTS / 2, CLIENTS / 2, stop.clone(), served.clone());
    let more = |n: u64| {
        let target = served.load(Ordering::Relaxed) + n;
        wait_for(DEADLINE, || {
            (served.load(Ordering::Relaxed) >= target).then_some(())
        })
    };
    let before = more(10 * CLIENTS as u64);
    during();
    let after = more(100 * CLIENTS as u64);
    stop.store(true, Ordering::Relaxed);
    let t = tally(handles);
    assert!(
        before.is_some() && after.is_some(),
        "the clients were not served: {t:?}"
    );
    t
}

fn pids_of_preforkd(c: &Container) -> String {
    c.ok("ps -eo pid=,args= | grep '[p]reforkd' || true")
}

#[test]
fn live_systemd() {
    let started = Instant::now();
    if !nix::unistd::Uid::effective().is_root() {
        return skip("needs root (debootstrap, systemd-nspawn)");
    }
    let (Ok(deb), Ok(deb_next)) = (
        std::env::var("PREFORKD_LIVE_DEB"),
        std::env::var("PREFORKD_LIVE_DEB_NEXT"),
    ) else {
        return skip(
            "PREFORKD_LIVE_DEB and PREFORKD_LIVE_DEB_NEXT are not set (packaging/live-systemd.sh sets them)",
        );
    };
    for tool in ["debootstrap", "systemd-nspawn", "nsenter"] {
        if !have(tool) {
            return skip(&format!(
                "{tool} is missing (apt-get install debootstrap systemd-container util-linux)"
            ));
        }
    }
    let cache = match cached_root() {
        Ok(r) => r,
        Err(why) => return skip(&why),
    };
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The packaged config on a port reserved here instead of 8009, put in
    // place before the install (dpkg keeps it: --force-confold).
    let packaged = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/preforkd.toml"
    ))
    .unwrap();
    assert!(packaged.contains("tcp://127.0.0.1:8009"));
    let config = packaged.replace("tcp://127.0.0.1:8009", &format!("tcp://{addr}"));
    let name = format!("preforkd-live-{}", std::process::id());
    let c = match Container::boot(&cache, &name, |root| {
        std::fs::copy(&deb, root.join("root/preforkd.deb")).unwrap();
        std::fs::copy(&deb_next, root.join("root/preforkd-next.deb")).unwrap();
    }) {
        Ok(c) => c,
        Err(why) => return skip(&why),
    };
    c.write(CONFIG, &config);
    let version = |c: &Container| c.ok("dpkg-query -W -f '${Version}' preforkd");

    println!("== dpkg -i: user, start after READY=1, status, echo");
    c.ok("dpkg -i --force-confold /root/preforkd.deb");
    assert_eq!(
        c.ok("getent passwd preforkd | cut -d: -f1,6,7"),
        "preforkd:/nonexistent:/usr/sbin/nologin"
    );
    // Type=notify: `systemctl start` (from postinst) returned only after
    // READY=1, which comes with the first STATUS=; the echo answers at once.
    assert_eq!(c.ok("systemctl is-active preforkd"), "active");
    let status = c.prop("preforkd.service", "StatusText");
    assert!(status.starts_with("generation 1; echo "), "{status}");
    echo(addr).expect("echo after install");
    // And systemd logged the start done only after the master's ready line.
    let journal = c.wait_journal("", "Started preforkd");
    let at = |needle: &str| journal.lines().position(|l| l.contains(needle));
    assert!(at("ready: echo") < at("Started preforkd"), "{journal}");
    assert!(at("ready: echo").is_some(), "{journal}");
    // The whole packaged config, user included, where the user exists.
    c.ok(&format!("preforkd check -c {CONFIG}"));

    println!("== workers: user preforkd, no capabilities; systemd-analyze security");
    let main = c.main_pid();
    let workers = c.ok(&format!("cat /proc/{main}/task/{main}/children"));
    let uid = c.ok("id -u preforkd");
    assert!(!workers.is_empty());
    for w in workers.split_whitespace() {
        let st = c.ok(&format!("cat /proc/{w}/status"));
        let field = |n: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(n))
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert!(field("Uid:").iter().all(|u| *u == uid), "worker {w}: {st}");
        for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
            assert_eq!(field(cap), ["0000000000000000"], "worker {w} {cap}");
        }
    }
    let security = c.ok("systemd-analyze security --no-pager preforkd.service | tail -n 1");
    let score: f64 = security
        .split("preforkd.service:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in {security:?}"));
    println!("{security}");
    assert!(score <= MAX_EXPOSURE, "{security}");

    println!("== systemctl reload: synchronous; a broken config fails, keeps serving");
    c.ok("systemctl reload preforkd");
    let status = c.prop("preforkd.service", "StatusText");
    assert!(
        status.starts_with("generation 2;"),
        "right after reload: {status}"
    );
    let broken = config.replace("workers = \"auto\"", "workers = \"lots\"");
    let line = broken
        .lines()
        .position(|l| l == "workers = \"lots\"")
        .unwrap()
        + 1;
    c.write(CONFIG, &broken);
    let out = c.sh("systemctl reload preforkd");
    assert!(
        !out.status.success(),
        "reload of a broken config: {}",
        show(&out)
    );
    let at = format!("{CONFIG}:{line}:11");
    c.wait_journal("", &at);
    assert_eq!(c.ok("systemctl is-active preforkd"), "active");
    assert!(
        c.prop("preforkd.service", "StatusText")
            .contains("last reload failed")
    );
    echo(addr).expect("echo after a failed reload");

    println!("== journald: priorities; worker lines carry the worker's pid");
    let errors = c.wait_journal("-p err", &at);
    assert!(
        !errors.contains("configuration is valid") && !errors.contains("ready: echo"),
        "-p err shows more than errors:\n{errors}"
    );
    assert!(
        c.ok("journalctl -u preforkd --no-pager -o cat -p info")
            .contains("ready: echo")
    );
    // A worker logs when max_requests recycles it.
    c.write(
        CONFIG,
        &config.replace("threads = 32\n", "threads = 32\nmax_requests = 1\n"),
    );
    c.ok("systemctl reload preforkd");
    let main = c.main_pid();
    for _ in 0..4 {
        echo(addr).expect("echo with max_requests = 1");
    }
    let lines = c.wait_journal("", "(max_requests); recycling");
    let worker_line = lines
        .lines()
        .find(|l| l.contains("(max_requests); recycling"))
        .unwrap();
    let pid = worker_line
        .strip_prefix("preforkd[")
        .and_then(|r| r.split(']').next())
        .unwrap_or_else(|| panic!("no pid in {worker_line:?}"));
    assert_ne!(pid, main.to_string(), "{worker_line}");
    assert!(
        lines.contains(&format!("(pid {pid})")),
        "the master never named worker {pid}:\n{lines}"
    );
    c.write(CONFIG, &config);
    c.ok("systemctl reload preforkd");

    println!("== watchdog: pinged; a stopped master is restarted");
    c.write(
        "/etc/systemd/system/preforkd.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=5s\n",
    );
    c.ok("systemctl daemon-reload && systemctl restart preforkd");
    let first = c.prop("preforkd.service", "WatchdogTimestampMonotonic");
    wait_for(DEADLINE, || {
        (c.prop("preforkd.service", "WatchdogTimestampMonotonic") != first).then_some(())
    })
    .expect("the watchdog timestamp never moved");
    let restarts: u32 = c.prop("preforkd.service", "NRestarts").parse().unwrap();
    let stopped = c.main_pid();
    c.ok(&format!("kill -STOP {stopped}"));
    wait_for(DEADLINE, || {
        let pid = c.main_pid();
        (pid != 0 && pid != stopped && c.ok("systemctl is-active preforkd || true") == "active")
            .then_some(())
    })
    .expect("systemd did not restart the stopped master");
    assert!(
        c.prop("preforkd.service", "NRestarts")
            .parse::<u32>()
            .unwrap()
            > restarts
    );
    c.wait_journal("", "Watchdog timeout");
    echo(addr).expect("echo after the watchdog restart");

    println!("== preforkd upgrade, SIGUSR2: MainPID follows; stop leaves nothing");
    let restarts = c.prop("preforkd.service", "NRestarts");
    let old = c.main_pid();
    let said = c.ok(&format!("preforkd -c {CONFIG} upgrade"));
    let new = c.main_pid();
    assert!(
        said.contains(&format!("master pid {new} took over from pid {old}")),
        "{said} (MainPID {new})"
    );
    wait_for(DEADLINE, || {
        (!c.sh(&format!("kill -0 {old}")).status.success()).then_some(())
    })
    .expect("the old master did not exit");
    echo(addr).expect("echo after upgrade");
    c.ok("systemctl kill -s SIGUSR2 --kill-whom=main preforkd");
    let newer = wait_for(DEADLINE, || {
        let p = c.main_pid();
        (p != new && p != 0).then_some(p)
    })
    .expect("MainPID did not move after SIGUSR2");
    assert_eq!(c.ok("cat /run/preforkd/preforkd.pid"), newer.to_string());
    assert_eq!(c.ok("systemctl is-active preforkd"), "active");
    assert_eq!(
        c.prop("preforkd.service", "NRestarts"),
        restarts,
        "an upgrade restarted the service"
    );
    echo(addr).expect("echo after SIGUSR2");
    c.ok("systemctl stop preforkd");
    assert_eq!(c.ok("systemctl is-active preforkd || true"), "inactive");
    // A graceful stop (ExecStop=), not systemd's SIGKILL to all.
    assert_eq!(c.prop("preforkd.service", "Result"), "success");
    assert_eq!(pids_of_preforkd(&c), "", "processes left after stop");

    println!("== socket activation: a restart refuses nothing");
    c.write(
        "/etc/systemd/system/preforkd.socket.d/port.conf",
        &format!("[Socket]\nListenStream=\nListenStream={addr}\n"),
    );
    c.ok("systemctl daemon-reload && systemctl start preforkd.socket && systemctl start preforkd");
    c.wait_journal("", "from systemd (socket activation");
    let t = under_load(addr, || {
        c.ok("systemctl restart preforkd");
    });
    println!("restart under socket activation: {t:?}");
    assert!(t.ok > 0);
    assert_eq!(t.failures(), 0, "{t:?}");
    c.ok("systemctl stop preforkd.socket preforkd && rm -r /etc/systemd/system/preforkd.socket.d");
    c.ok("systemctl daemon-reload && systemctl start preforkd");

    println!("== dpkg -i of a newer version under load: a hot binary upgrade");
    let restarts = c.prop("preforkd.service", "NRestarts");
    let before = c.main_pid();
    let old_version = version(&c);
    let mut dpkg = None;
    let t = under_load(addr, || {
        dpkg = Some(c.sh("dpkg -i /root/preforkd-next.deb"));
    });
    let dpkg = dpkg.unwrap();
    assert!(dpkg.status.success(), "{}", show(&dpkg));
    let after = c.main_pid();
    println!(
        "package upgrade {old_version} -> {}: MainPID {before} -> {after}; requests ok {}, reconnects after FIN {}, failed {:?}",
        version(&c),
        t.ok,
        t.reconnects,
        t.failed
    );
    assert_ne!(after, before, "MainPID did not move");
    assert_eq!(c.ok("cat /run/preforkd/preforkd.pid"), after.to_string());
    assert_eq!(
        c.prop("preforkd.service", "NRestarts"),
        restarts,
        "the upgrade fell back to a restart:\n{}",
        show(&dpkg)
    );
    assert!(t.ok > 0);
    assert_eq!(
        t.failures(),
        0,
        "failed requests through the package upgrade: {t:?}"
    );
    assert!(
        !String::from_utf8_lossy(&dpkg.stderr).contains("binary upgrade failed"),
        "{}",
        show(&dpkg)
    );

    println!("== dpkg --purge: unit, config, processes gone; the user kept");
    c.ok("rm -r /etc/systemd/system/preforkd.service.d && systemctl daemon-reload");
    c.ok("dpkg --purge preforkd");
    assert_eq!(pids_of_preforkd(&c), "", "processes left after purge");
    assert_eq!(c.prop("preforkd.service", "LoadState"), "not-found");
    c.ok("test ! -e /usr/lib/systemd/system/preforkd.service && test ! -e /etc/preforkd && test ! -e /var/log/preforkd");
    c.ok("test ! -e /etc/systemd/system/multi-user.target.wants/preforkd.service");
    // Debian keeps system users on purge (their uid may own files still).
    c.ok("getent passwd preforkd");
    assert!(echo(addr).is_err(), "something still serves {addr}");
    drop(c);
    println!("live_systemd: {:.1} s", started.elapsed().as_secs_f64());
}
