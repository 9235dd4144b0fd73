//! Log targets, on the real binary: syslog (RFC 5424 and 3164) on a
//! test-owned Unix datagram socket, with the workers' own pids; the
//! fallback to standard error when the syslog socket is missing; the file
//! target reopened on SIGUSR1 after a rename; a log file that cannot be
//! opened; journald priority prefixes when JOURNAL_STREAM names stderr.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::Duration;

use common::{DEADLINE, Daemon, bin, service, tempdir, wait_for};

/// Starts preforkd in `dir` (already holding what the test prepared) on
/// `config`, `{dir}` replaced by the directory.
fn start_in(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Daemon {
    let path = dir.path().join("preforkd.toml");
    fs::write(&path, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("-c").arg(&path);
    Daemon::spawn(cmd, dir, env)
}

/// An echo service on `{dir}/echo.sock` whose workers recycle after one
/// connection: each exchange makes a worker log a line of its own.
fn recycling_echo(workers: u32) -> String {
    service(
        "echo",
        &["unix:{dir}/echo.sock"],
        "echo",
        &format!("workers = {workers}\nmax_requests = 1"),
    )
}

/// One echo exchange on the service's Unix socket.
fn echo(d: &Daemon) {
    let mut s = UnixStream::connect(d.path("echo.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hi\n").unwrap();
    let mut got = [0u8; 3];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi\n");
}

/// A syslog daemon of our own: a Unix datagram socket in the test's dir.
struct Syslog {
    sock: UnixDatagram,
    records: Vec<String>,
}

impl Syslog {
    fn bind(dir: &tempfile::TempDir) -> Syslog {
        let sock = UnixDatagram::bind(dir.path().join("log.sock")).unwrap();
        sock.set_nonblocking(true).unwrap();
        Syslog {
            sock,
            records: Vec::new(),
        }
    }

    fn drain(&mut self) {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.records
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// Waits for a record containing `needle`; returns it.
    fn wait(&mut self, needle: &str, d: &Daemon) -> String {
        wait_for(DEADLINE, || {
            self.drain();
            self.records.iter().find(|r| r.contains(needle)).cloned()
        })
        .unwrap_or_else(|| {
            panic!(
                "no syslog record with {needle:?}; records:\n{}\nstderr:\n{}",
                self.records.join("\n"),
                d.log_text()
            )
        })
    }
}

/// An RFC 5424 record, split: (PRI, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSG).
fn parse_5424(r: &str) -> (u32, String, String, String, i32, String) {
    let rest = r.strip_prefix('<').unwrap_or_else(|| panic!("no PRI: {r}"));
    let (pri, rest) = rest
        .split_once(">1 ")
        .unwrap_or_else(|| panic!("no version 1: {r}"));
    let f: Vec<&str> = rest.splitn(7, ' ').collect();
    assert_eq!(f.len(), 7, "{r}");
    assert_eq!(
        (f[4], f[5]),
        ("-", "-"),
        "MSGID and STRUCTURED-DATA nil: {r}"
    );
    humantime::parse_rfc3339(f[0]).unwrap_or_else(|e| panic!("timestamp {:?}: {e}: {r}", f[0]));
    assert!(!f[1].is_empty(), "{r}");
    (
        pri.parse().unwrap(),
        f[0].into(),
        f[1].into(),
        f[2].into(),
        f[3].parse().unwrap(),
        f[6].into(),
    )
}

#[test]
fn syslog_rfc5424_records_carry_each_processs_pid() {
    let dir = tempdir();
    let mut syslog = Syslog::bind(&dir);
    let d = start_in(
        dir,
        &format!(
            "[log]\ntarget = \"syslog\"\nsyslog = \"unix:{{dir}}/log.sock\"\nsyslog_format = \"rfc5424\"\nfacility = \"local3\"\n{}",
            recycling_echo(2)
        ),
        &[],
    );
    let master = d.pid();
    let ready = syslog.wait("ready: ", &d);
    let (pri, _, _, app, pid, msg) = parse_5424(&ready);
    assert_eq!(pri, 19 * 8 + 6, "local3.info: {ready}");
    assert_eq!((app.as_str(), pid), ("preforkd", master), "{ready}");
    assert!(msg.starts_with("ready: "), "{ready}");
    let workers = d.wait_workers(2);

    // Each exchange makes the worker that served it log its recycling.
    echo(&d);
    let recycled = syslog.wait("(max_requests); recycling", &d);
    let (pri, _, _, _, pid, msg) = parse_5424(&recycled);
    assert_eq!(pri, 19 * 8 + 6, "{recycled}");
    assert!(
        workers.contains(&pid),
        "the record carries pid {pid}, not a worker's ({workers:?}): {recycled}"
    );
    assert!(msg.starts_with("worker echo#"), "{recycled}");
    // The master logs its exit with its own pid.
    let exit = syslog.wait(&format!("(pid {pid}) exited"), &d);
    assert_eq!(parse_5424(&exit).4, master, "{exit}");

    syslog.drain();
    for r in &syslog.records {
        parse_5424(r);
    }
    assert_eq!(d.log_text(), "", "nothing on stderr when syslog works");
}

#[test]
fn syslog_rfc3164_records_carry_each_processs_pid() {
    let dir = tempdir();
    let mut syslog = Syslog::bind(&dir);
    let d = start_in(
        dir,
        &format!(
            "[log]\ntarget = \"syslog\"\nsyslog = \"unix:{{dir}}/log.sock\"\n{}",
            recycling_echo(1)
        ),
        &[],
    );
    // <PRI>Mmm dd hh:mm:ss preforkd[PID]: MSG, daemon.info = 3 * 8 + 6.
    let check = |r: &str| -> (i32, String) {
        let rest = r.strip_prefix("<30>").unwrap_or_else(|| panic!("{r}"));
        let (stamp, rest) = rest.split_at("Jan 01 00:00:00".len());
        let b = stamp.as_bytes();
        assert!(
            b[3] == b' ' && b[6] == b' ' && b[9] == b':' && b[12] == b':',
            "timestamp {stamp:?}: {r}"
        );
        let rest = rest
            .strip_prefix(" preforkd[")
            .unwrap_or_else(|| panic!("{r}"));
        let (pid, msg) = rest.split_once("]: ").unwrap_or_else(|| panic!("{r}"));
        (pid.parse().unwrap(), msg.to_string())
    };
    let ready = syslog.wait("ready: ", &d);
    assert_eq!(check(&ready).0, d.pid(), "{ready}");
    let worker = d.wait_workers(1)[0];
    echo(&d);
    let recycled = syslog.wait("(max_requests); recycling", &d);
    assert_eq!(check(&recycled).0, worker, "{recycled}");
}

#[test]
fn missing_syslog_socket_falls_back_to_stderr() {
    let d = Daemon::start(&format!(
        "[log]\ntarget = \"syslog\"\nsyslog = \"unix:{{dir}}/nobody-listens.sock\"\n{}",
        recycling_echo(1)
    ));
    let warning = d.wait_log("cannot use syslog at unix:");
    assert!(warning.contains(" WARN: "), "{warning}");
    assert!(
        warning.contains("nobody-listens.sock: No such file or directory"),
        "{warning}"
    );
    assert!(
        warning.ends_with("logging to standard error instead"),
        "{warning}"
    );
    d.wait_ready();
    let worker = d.wait_workers(1)[0];
    echo(&d);
    d.wait_log(&format!(
        "preforkd[{worker}]: INFO: worker echo#0: served 1"
    ));
}

#[test]
fn file_target_is_reopened_on_sigusr1_by_master_and_workers() {
    let d = Daemon::start(&format!(
        "[log]\ntarget = \"file\"\nfile = \"{{dir}}/out.log\"\n{}",
        recycling_echo(1)
    ));
    let file = d.path("out.log");
    let read = |p: &std::path::Path| fs::read_to_string(p).unwrap_or_default();
    let has = |p: &std::path::Path, needle: &str| {
        wait_for(DEADLINE, || read(p).contains(needle).then_some(()))
            .unwrap_or_else(|| panic!("{needle:?} not in {}:\n{}", p.display(), read(p)))
    };
    has(&file, "INFO: ready: ");
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(d.log_text(), "", "nothing on stderr with a log file");
    let worker = d.wait_workers(1)[0];

    // logrotate: rename, then SIGUSR1 to the master.
    let rotated = d.path("out.log.1");
    fs::rename(&file, &rotated).unwrap();
    d.signal(libc::SIGUSR1);
    has(&file, "SIGUSR1: log files reopened; told 1 worker");
    // The worker reopens before its next record.
    echo(&d);
    has(
        &file,
        &format!("preforkd[{worker}]: INFO: worker echo#0: served 1 requests"),
    );
    // Its replacement, forked after the reopen, writes there too.
    let next = wait_for(DEADLINE, || d.workers().into_iter().find(|w| *w != worker))
        .expect("a replacement worker");
    d.wait_workers(1);
    echo(&d);
    has(
        &file,
        &format!("preforkd[{next}]: INFO: worker echo#0: served 1 requests"),
    );
    let old = read(&rotated);
    assert!(old.contains("INFO: ready: "), "{old}");
    assert!(!old.contains("served 1 requests"), "{old}");
    assert!(!old.contains("SIGUSR1"), "{old}");
}

#[test]
fn log_file_in_a_missing_directory_exits_73() {
    let mut d = Daemon::start(&format!(
        "[log]\ntarget = \"file\"\nfile = \"{{dir}}/no/such/dir/out.log\"\n{}",
        recycling_echo(1)
    ));
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(73), "log:\n{}", d.log_text());
    let text = d.log_text();
    let want = format!(
        "ERROR: log file {}: cannot open: No such file or directory",
        d.path("no/such/dir/out.log").display()
    );
    assert!(text.contains(&want), "{text}");
    assert!(!text.contains("spawned"), "nothing forked:\n{text}");
}

#[test]
fn stderr_under_journald_has_priority_prefixes() {
    let dir = tempdir();
    // The harness opens preforkd.log (truncating, same inode) as stderr.
    let log = dir.path().join("preforkd.log");
    fs::write(&log, "").unwrap();
    let meta = fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let d = start_in(dir, &recycling_echo(1), &[("JOURNAL_STREAM", &stream)]);
    let ready = d.wait_log("ready: ");
    assert_eq!(
        ready,
        format!(
            "<6>preforkd[{}]: {}",
            d.pid(),
            &ready[ready.find("ready: ").unwrap()..]
        )
    );
    let worker = d.wait_workers(1)[0];
    echo(&d);
    d.wait_log(&format!("<6>preforkd[{worker}]: worker echo#0: served 1"));
    for l in d.log_text().lines() {
        assert!(l.starts_with('<'), "every line has a priority: {l}");
    }
}

#[test]
fn stderr_elsewhere_has_timestamps() {
    // JOURNAL_STREAM names another file (the journal's stream of a parent,
    // say): standard error is not it.
    let d = start_in(tempdir(), &recycling_echo(1), &[("JOURNAL_STREAM", "1:1")]);
    let ready = d.wait_log("INFO: ready: ");
    let stamp = ready.split(' ').next().unwrap();
    humantime::parse_rfc3339(stamp).unwrap_or_else(|e| panic!("{stamp:?}: {e}: {ready}"));
    assert!(
        ready.contains(&format!(" preforkd[{}]: INFO: ready: ", d.pid())),
        "{ready}"
    );
}

#[test]
fn a_full_syslog_socket_drops_records_and_never_blocks() {
    let dir = tempdir();
    let mut syslog = Syslog::bind(&dir);
    let qlen: usize = fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(512);
    let d = start_in(
        dir,
        &format!(
            "[log]\ntarget = \"syslog\"\nsyslog = \"unix:{{dir}}/log.sock\"\nlevel = \"debug\"\n{}",
            recycling_echo(1)
        ),
        &[],
    );
    syslog.wait("ready: ", &d);
    // Nobody reads: each exchange logs 4 records (the worker's recycling,
    // its exit, the replacement's spawn and ready), so the queue fills.
    let rounds = qlen / 4 + 20;
    for _ in 0..rounds {
        echo(&d);
    }
    d.wait_workers(1);
    // Read what was queued; the next records get through and say how many
    // were lost.
    syslog.drain();
    let queued = syslog.records.len();
    assert!(
        queued < rounds * 4,
        "{queued} of {} records queued: none dropped?",
        rounds * 4
    );
    echo(&d);
    let note = syslog.wait("earlier log records were dropped", &d);
    assert!(note.starts_with("<28>"), "daemon.warning: {note}");
    assert_eq!(d.log_text(), "", "nothing on stderr");
}

#[test]
fn a_log_file_on_a_full_disk_never_stops_a_worker() {
    // /dev/full: every write(2) fails with ENOSPC.
    let mut d = Daemon::start(&format!(
        "[log]\ntarget = \"file\"\nfile = \"/dev/full\"\n{}",
        recycling_echo(2)
    ));
    let first = d.wait_workers(2);
    // Each exchange recycles a worker, which logs (and fails to) on its way out.
    for _ in 0..6 {
        echo(&d);
    }
    let now = d.wait_workers(2);
    assert!(
        now.iter().any(|w| !first.contains(w)),
        "workers were replaced: {first:?} -> {now:?}"
    );
    assert!(d.child.try_wait().unwrap().is_none(), "the master is alive");
}

/// Splits RFC 6587 octet-counted frames (`LEN SP RECORD`) off `buf`.
fn frames(buf: &mut Vec<u8>) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(sp) = buf.iter().position(|b| *b == b' ') {
        let len: usize = std::str::from_utf8(&buf[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad frame: {:?}", String::from_utf8_lossy(buf)));
        if buf.len() < sp + 1 + len {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[sp + 1..sp + 1 + len]).into_owned());
        buf.drain(..sp + 1 + len);
    }
    out
}

#[test]
fn syslog_over_tcp_frames_records_and_each_process_connects_itself() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let d = Daemon::start(&format!(
        "[log]\ntarget = \"syslog\"\nsyslog = \"tcp://127.0.0.1:{port}\"\nsyslog_format = \"rfc5424\"\n{}",
        recycling_echo(1)
    ));
    let mut conns: Vec<(std::net::TcpStream, Vec<u8>)> = Vec::new();
    let mut records: Vec<String> = Vec::new();
    let mut poll = |records: &mut Vec<String>| {
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true).unwrap();
            conns.push((s, Vec::new()));
        }
        for (s, buf) in &mut conns {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            records.extend(frames(buf));
        }
        conns.len()
    };
    let mut wait = |needle: &str, records: &mut Vec<String>| -> (String, usize) {
        wait_for(DEADLINE, || {
            let n = poll(records);
            records
                .iter()
                .find(|r| r.contains(needle))
                .map(|r| (r.clone(), n))
        })
        .unwrap_or_else(|| panic!("no record {needle:?}: {records:?}\n{}", d.log_text()))
    };
    // The master's records wait while it connects, and go with the next
    // one or at its next wake.
    let (ready, _) = wait("ready: ", &mut records);
    assert_eq!(parse_5424(&ready).4, d.pid(), "{ready}");
    let worker = d.wait_workers(1)[0];
    echo(&d);
    let (recycled, conns) = wait("(max_requests); recycling", &mut records);
    assert_eq!(parse_5424(&recycled).4, worker, "{recycled}");
    assert!(
        conns >= 2,
        "the worker connected on its own: {conns} connections"
    );
    for r in &records {
        parse_5424(r);
    }
}

#[test]
fn syslog_over_udp_rfc3164_names_the_host() {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let port = sock.local_addr().unwrap().port();
    let d = Daemon::start(&format!(
        "[log]\ntarget = \"syslog\"\nsyslog = \"udp://127.0.0.1:{port}\"\nfacility = \"local7\"\n{}",
        recycling_echo(1)
    ));
    let mut buf = [0u8; 65536];
    let ready = wait_for(DEADLINE, || {
        let n = sock.recv(&mut buf).ok()?;
        let r = String::from_utf8_lossy(&buf[..n]).into_owned();
        r.contains("ready: ").then_some(r)
    })
    .unwrap_or_else(|| panic!("no ready record; stderr:\n{}", d.log_text()));
    // <190>Mmm dd hh:mm:ss HOST preforkd[PID]: ready: ...
    assert!(ready.starts_with("<190>"), "local7.info: {ready}");
    let after_stamp = &ready["<190>Jan 01 00:00:00 ".len()..];
    let (host, rest) = after_stamp.split_once(' ').unwrap();
    assert!(!host.is_empty() && !host.starts_with("preforkd"), "{ready}");
    assert!(
        rest.starts_with(&format!("preforkd[{}]: ready: ", d.pid())),
        "{ready}"
    );
}

#[test]
fn reload_keeps_the_target_and_says_so() {
    let d = Daemon::start(&recycling_echo(1));
    d.wait_ready();
    d.write_config(&format!(
        "[log]\ntarget = \"file\"\nfile = \"{{dir}}/out.log\"\n{}",
        recycling_echo(1)
    ));
    d.signal(libc::SIGHUP);
    let warning = d
        .wait_log("reload: [log] target changes take effect at the next restart or binary upgrade");
    assert!(warning.contains(" WARN: "), "{warning}");
    d.wait_log("reload (generation 2) succeeded");
    assert!(
        !d.path("out.log").exists(),
        "the file target was not applied"
    );
}

/// Audit row: with `[daemon] user` set the log file is `root:root 0640`, so
/// on SIGUSR1 workers that dropped privileges could not reopen it and kept
/// writing to the rotated file. The master opens the new file and hands
/// its descriptor to the workers: they write to the new file, and it stays
/// root's.
#[test]
fn workers_of_another_user_follow_the_reopened_file() {
    // SAFETY: geteuid(2) has no memory effects and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run workers as nobody (CI runs as root)");
        return;
    }
    let d = Daemon::start(&format!(
        "[daemon]\nuser = \"nobody\"\ngroup = \"nogroup\"\n\n[log]\ntarget = \"file\"\nfile = \"{{dir}}/out.log\"\n{}",
        recycling_echo(1)
    ));
    let file = d.path("out.log");
    let read = |p: &std::path::Path| fs::read_to_string(p).unwrap_or_default();
    let has = |p: &std::path::Path, needle: &str| {
        wait_for(DEADLINE, || read(p).contains(needle).then_some(()))
            .unwrap_or_else(|| panic!("{needle:?} not in {}:\n{}", p.display(), read(p)))
    };
    has(&file, "INFO: ready: ");
    let worker = d.wait_workers(1)[0];
    let rotated = d.path("out.log.1");
    fs::rename(&file, &rotated).unwrap();
    d.signal(libc::SIGUSR1);
    has(&file, "SIGUSR1: log files reopened; told 1 worker");
    echo(&d);
    has(
        &file,
        &format!("preforkd[{worker}]: INFO: worker echo#0: served 1 requests"),
    );
    let old = read(&rotated);
    assert!(!old.contains("served 1 requests"), "{old}");
    assert!(!old.contains("cannot reopen"), "{old}");
    let meta = fs::metadata(&file).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o640),
        "the new file is root's"
    );
}
