//! What the end-to-end tests share: running the loadgen binary with a
//! limit on its time, reading its JSON, and small servers started by the
//! test on 127.0.0.1:0 (each connection on a thread of its own, with a
//! small stack, so a test can hold thousands).

#![allow(dead_code)] // each test binary uses its own part of this

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run `cmd` (loadgen with its arguments); fail the test if it takes
/// longer than `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loadgen");
    while child.try_wait().expect("poll loadgen").is_none() {
        if t.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("loadgen {cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        child.wait_with_output().expect("collect loadgen"),
        t.elapsed(),
    )
}

pub fn loadgen_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    c.args(args);
    c
}

/// Run loadgen with `args`; fail the test if it takes longer than `limit`.
pub fn loadgen(args: &[&str], limit: Duration) -> (Output, Duration) {
    run(loadgen_cmd(args), limit)
}

/// The raw value of `key` in loadgen's flat JSON (keys are unique enough
/// for this).
fn raw<'a>(json: &'a str, key: &str) -> &'a str {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    let rest = &json[at + key.len() + 3..];
    let end = rest.find([',', '}']).unwrap();
    &rest[..end]
}

/// A number from loadgen's JSON.
pub fn field(json: &str, key: &str) -> f64 {
    raw(json, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

/// A boolean from loadgen's JSON.
pub fn flag(json: &str, key: &str) -> bool {
    match raw(json, key) {
        "true" => true,
        "false" => false,
        v => panic!("{key} is {v}, not a boolean, in {json}"),
    }
}

/// loadgen's stdout, after checking that it exited 0.
pub fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn echo<S: Read + Write>(mut s: S) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// A TCP server on 127.0.0.1:0 that runs `serve` on each connection, on a
/// thread of its own; its address.
pub fn tcp_server(serve: fn(TcpStream)) -> String {
    let l = listener();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let spawned = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || serve(s));
            if spawned.is_err() {
                // Out of threads: the client sees a close, a test failure.
                continue;
            }
        }
    });
    addr
}

/// A listener on 127.0.0.1:0 with a backlog of 1024, as the peers and
/// preforkd have (std's bind gives 128, which a ramp of a connect window
/// of 256 overflows, costing one-second SYN retransmits).
pub fn listener() -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    s.listen(1024).unwrap();
    s.into()
}

/// An echo server over TCP; its address.
pub fn tcp_echo() -> String {
    tcp_server(echo)
}

/// Raise this process's soft RLIMIT_NOFILE to the hard limit (the test's
/// own servers hold a descriptor per connection); the limit now.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for the kernel to fill; checked.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r.rlim_cur = r.rlim_max;
    // SAFETY: the limit just read, soft raised to hard (always allowed).
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
    r.rlim_cur
}
