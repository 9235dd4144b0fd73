//! The command line: modes, engines, the target (loopback or a Unix socket,
//! nothing else) and the bounds of a run.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Every run stops by itself: these are the largest values accepted.
const MAX_DURATION_S: f64 = 300.0;
const MAX_WARMUP_S: f64 = 60.0;
/// The threads engine runs a thread per connection: more would only
/// measure the scheduler.
pub const MAX_THREAD_CONNECTIONS: usize = 1024;
/// The epoll engine: bounded by descriptors (checked against
/// RLIMIT_NOFILE at start) and by ports, not by this.
pub const MAX_EVENT_CONNECTIONS: usize = 100_000;
const MAX_LOOPS: usize = 64;
const MAX_STREAM_SIZE: usize = 1 << 20;
const MAX_DATAGRAM_SIZE: usize = 65507;
const MAX_TIMEOUT_MS: u64 = 60_000;

pub const USAGE: &str = "\
usage: loadgen [MODE] TARGET [OPTIONS]

MODE (default rr, or udp with --udp)
  rr        each connection sends a message, waits for its echo, again
  connect   each loop: connect, send one message, read its echo, close
  hold      open -c connections, one echo on each, hold them idle for -d
            seconds, one more echo on each, close; reports whether all
            were served (epoll engine)
  udp       each socket sends a datagram and waits for its echo, again
  wait      try until one echo succeeds or --timeout-ms passes; exit 0 or 1

TARGET (127.0.0.0/8, ::1 or a Unix socket: nothing else is accepted)
  --tcp HOST:PORT | --unix PATH | --udp HOST:PORT

OPTIONS
  -c, --connections N   concurrent connections (default 8; at most 1024 on
                        the threads engine, 100000 on epoll)
  -s, --size N          message size in bytes, the last one '\\n' (default 64)
  -d, --duration S      measured seconds; in hold mode, the idle time
                        (default 10, at most 300)
  -w, --warmup S        seconds run before measuring (default 0, at most 60)
      --engine E        epoll: --loops threads, each an event loop over its
                        share of the connections (default for rr, connect
                        and hold); threads: a thread per connection with
                        blocking sockets (the only engine for udp)
      --loops N         epoll engine: client threads (default 1, at most 64
                        and at most -c)
      --timeout-ms N    limit on each connect and each echo (default 5000);
                        in wait mode, on the whole wait
      --src-ips N       TCP to an IPv4 target: connect from 127.0.0.1 to
                        127.0.0.N in turn (default 1), for connect mode past
                        the ~14k/s that one source address allows
      --json            one JSON object on stdout, the summary on stderr
      --fail-on-error   exit 1 when any request failed
  -h, --help
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Rr,
    Connect,
    Hold,
    Udp,
    Wait,
}

/// How the load is generated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Engine {
    /// A thread per connection, blocking sockets.
    Threads,
    /// `loops` threads, each an event loop over nonblocking sockets.
    Epoll,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Threads => "threads",
            Engine::Epoll => "epoll",
        }
    }
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Rr => "rr",
            Mode::Connect => "connect",
            Mode::Hold => "hold",
            Mode::Udp => "udp",
            Mode::Wait => "wait",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Udp(SocketAddr),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "tcp:{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub engine: Engine,
    /// Event loops of the epoll engine (1 on the threads engine).
    pub loops: usize,
    pub target: Target,
    pub connections: usize,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub timeout: Duration,
    pub src_ips: u8,
    pub json: bool,
    pub fail_on_error: bool,
}

impl Config {
    /// The source address of the `n`th connect (None: the kernel's choice).
    pub fn source(&self, n: u64) -> Option<Ipv4Addr> {
        match self.target {
            Target::Tcp(SocketAddr::V4(_)) if self.src_ips > 1 => Some(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (n % u64::from(self.src_ips)) as u8,
            )),
            _ => None,
        }
    }
}

/// Resolve HOST:PORT and refuse anything but loopback: this tool must never
/// send traffic to another machine, whatever a name resolves to.
pub fn loopback(spec: &str, flag: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = spec
        .to_socket_addrs()
        .map_err(|e| format!("{flag} {spec}: {e} (give HOST:PORT, e.g. 127.0.0.1:8009)"))?
        .collect();
    match addrs.iter().find(|a| !a.ip().is_loopback()) {
        Some(bad) => Err(format!(
            "{flag} {spec}: {} is not a loopback address; loadgen only sends to 127.0.0.0/8, ::1 or a Unix socket",
            bad.ip()
        )),
        None => addrs
            .first()
            .copied()
            .ok_or_else(|| format!("{flag} {spec}: resolves to no address")),
    }
}

fn number<T: std::str::FromStr>(v: &str, flag: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{flag}: {v:?} is not a number"))
}

fn seconds(v: &str, flag: &str, max: f64) -> Result<Duration, String> {
    let s: f64 = number(v, flag)?;
    if !(0.0..=max).contains(&s) {
        return Err(format!("{flag}: {s} is out of range (0 to {max} seconds)"));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Ok(None) for --help.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Config>, String> {
    let mut mode = None;
    let mut target = None;
    let mut engine = None;
    let mut loops = None;
    let mut warmup_given = false;
    let mut cfg = Config {
        mode: Mode::Rr,
        engine: Engine::Epoll,
        loops: 1,
        target: Target::Unix(PathBuf::new()),
        connections: 8,
        size: 64,
        duration: Duration::from_secs(10),
        warmup: Duration::ZERO,
        timeout: Duration::from_millis(5000),
        src_ips: 1,
        json: false,
        fail_on_error: false,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // --flag=value and --flag value alike.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let mut set_target = |t: Target| match target.replace(t) {
            Some(_) => Err("give one target only: --tcp, --unix or --udp".to_string()),
            None => Ok(()),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "rr" | "connect" | "hold" | "udp" | "wait" if mode.is_none() => {
                mode = Some(match flag.as_str() {
                    "rr" => Mode::Rr,
                    "connect" => Mode::Connect,
                    "hold" => Mode::Hold,
                    "udp" => Mode::Udp,
                    _ => Mode::Wait,
                })
            }
            "--tcp" => set_target(Target::Tcp(loopback(&val()?, &flag)?))?,
            "--udp" => set_target(Target::Udp(loopback(&val()?, &flag)?))?,
            "--unix" => set_target(Target::Unix(PathBuf::from(val()?)))?,
            "-c" | "--connections" | "--concurrency" => cfg.connections = number(&val()?, &flag)?,
            "-s" | "--size" => cfg.size = number(&val()?, &flag)?,
            "-d" | "--duration" => cfg.duration = seconds(&val()?, &flag, MAX_DURATION_S)?,
            "-w" | "--warmup" => {
                cfg.warmup = seconds(&val()?, &flag, MAX_WARMUP_S)?;
                warmup_given = true;
            }
            "--engine" => {
                engine = Some(match val()?.as_str() {
                    "epoll" => Engine::Epoll,
                    "threads" => Engine::Threads,
                    other => {
                        return Err(format!("{flag}: {other:?}: give epoll or threads"));
                    }
                })
            }
            "--loops" => {
                let n: usize = number(&val()?, &flag)?;
                if !(1..=MAX_LOOPS).contains(&n) {
                    return Err(format!("{flag}: 1 to {MAX_LOOPS}"));
                }
                loops = Some(n);
            }
            "--timeout-ms" => {
                let ms: u64 = number(&val()?, &flag)?;
                if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                    return Err(format!("{flag}: 1 to {MAX_TIMEOUT_MS}"));
                }
                cfg.timeout = Duration::from_millis(ms);
            }
            "--src-ips" => {
                cfg.src_ips = number(&val()?, &flag)?;
                if !(1..=254).contains(&cfg.src_ips) {
                    return Err(format!("{flag}: 1 to 254"));
                }
            }
            "--json" => cfg.json = true,
            "--fail-on-error" => cfg.fail_on_error = true,
            _ => return Err(format!("unknown argument {arg:?} (see loadgen --help)")),
        }
    }
    cfg.target = target.ok_or("no target: give --tcp HOST:PORT, --unix PATH or --udp HOST:PORT")?;
    let udp = matches!(cfg.target, Target::Udp(_));
    cfg.mode = match mode {
        None if udp => Mode::Udp,
        None => Mode::Rr,
        Some(Mode::Udp) if !udp => return Err("udp mode needs --udp HOST:PORT".into()),
        Some(m @ (Mode::Rr | Mode::Connect | Mode::Hold)) if udp => {
            return Err(format!("{} mode needs --tcp or --unix", m.name()));
        }
        Some(m) => m,
    };
    cfg.engine = match (engine, cfg.mode) {
        (Some(Engine::Epoll), Mode::Udp) => {
            return Err("udp mode runs on the threads engine only: leave --engine out".into());
        }
        (Some(Engine::Threads), Mode::Hold) => {
            return Err("hold mode runs on the epoll engine only: leave --engine out".into());
        }
        (Some(e), _) => e,
        (None, Mode::Udp) => Engine::Threads,
        (None, _) => Engine::Epoll,
    };
    let max_connections = match cfg.engine {
        Engine::Threads => MAX_THREAD_CONNECTIONS,
        Engine::Epoll => MAX_EVENT_CONNECTIONS,
    };
    if !(1..=max_connections).contains(&cfg.connections) {
        return Err(format!(
            "--connections: 1 to {max_connections} on the {} engine",
            cfg.engine.name()
        ));
    }
    if let Some(n) = loops {
        if cfg.engine != Engine::Epoll {
            return Err("--loops applies to the epoll engine".into());
        }
        if n > cfg.connections {
            return Err(format!(
                "--loops {n} with -c {}: give at most one loop per connection",
                cfg.connections
            ));
        }
        cfg.loops = n;
    }
    if cfg.mode == Mode::Hold && warmup_given {
        return Err("--warmup: hold mode has no warm-up (-d is its idle time)".into());
    }
    let max = if udp {
        MAX_DATAGRAM_SIZE
    } else {
        MAX_STREAM_SIZE
    };
    if !(1..=max).contains(&cfg.size) {
        return Err(format!("--size: 1 to {max} bytes"));
    }
    if cfg.duration.is_zero() && cfg.mode != Mode::Wait {
        return Err("--duration: must be more than 0".into());
    }
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Option<Config>, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn defaults_and_modes() {
        let c = parse_str("--tcp 127.0.0.1:9").unwrap().unwrap();
        assert_eq!((c.mode, c.connections, c.size), (Mode::Rr, 8, 64));
        assert_eq!((c.engine, c.loops), (Engine::Epoll, 1));
        assert_eq!(c.duration, Duration::from_secs(10));
        let c = parse_str("--udp [::1]:9 -c 3").unwrap().unwrap();
        assert_eq!((c.mode, c.connections), (Mode::Udp, 3));
        assert_eq!(c.engine, Engine::Threads, "udp runs on threads");
        let c = parse_str("connect --unix /x.sock --duration=2.5 --json")
            .unwrap()
            .unwrap();
        assert_eq!(c.mode, Mode::Connect);
        assert!(c.json && c.duration == Duration::from_millis(2500));
        let c = parse_str("wait --tcp localhost:9 --timeout-ms 20000")
            .unwrap()
            .unwrap();
        assert_eq!((c.mode, c.timeout), (Mode::Wait, Duration::from_secs(20)));
        assert!(parse_str("--help").unwrap().is_none());
    }

    #[test]
    fn only_loopback_targets() {
        for bad in [
            "--tcp 192.0.2.1:80",
            "--udp 10.0.0.1:53",
            "--tcp [2001:db8::1]:80",
            "--tcp 0.0.0.0:80",
        ] {
            let e = parse_str(bad).unwrap_err();
            assert!(e.contains("not a loopback address"), "{bad}: {e}");
        }
        assert!(parse_str("--tcp 127.8.9.10:80").is_ok());
    }

    #[test]
    fn bad_input_is_refused() {
        for bad in [
            "-c 8",
            "--tcp 127.0.0.1:9 --unix /x",
            "udp --tcp 127.0.0.1:9",
            "rr --udp 127.0.0.1:9",
            "--tcp 127.0.0.1:9 -c 0",
            "--tcp 127.0.0.1:9 -c 100001",
            "--engine threads --tcp 127.0.0.1:9 -c 1025",
            "--engine fibers --tcp 127.0.0.1:9",
            "--engine epoll --udp 127.0.0.1:9",
            "hold --engine threads --tcp 127.0.0.1:9",
            "hold --tcp 127.0.0.1:9 --warmup 1",
            "--tcp 127.0.0.1:9 -c 2 --loops 3",
            "--tcp 127.0.0.1:9 --loops 0",
            "--engine threads --tcp 127.0.0.1:9 --loops 2",
            "--tcp 127.0.0.1:9 -s 0",
            "--tcp 127.0.0.1:9 -d 301",
            "--tcp 127.0.0.1:9 -d 0",
            "--tcp 127.0.0.1:9 --bogus",
            "--tcp",
        ] {
            assert!(parse_str(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn engines_loops_and_hold() {
        let c = parse_str("rr --tcp 127.0.0.1:9 -c 10000 --loops 4")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.engine, c.loops, c.connections),
            (Engine::Epoll, 4, 10000)
        );
        let c = parse_str("connect --engine threads --tcp 127.0.0.1:9")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.mode, c.engine, c.loops),
            (Mode::Connect, Engine::Threads, 1)
        );
        let c = parse_str("hold --unix /x.sock -c 500 -d 2")
            .unwrap()
            .unwrap();
        assert_eq!((c.mode, c.engine), (Mode::Hold, Engine::Epoll));
        assert_eq!(c.duration, Duration::from_secs(2));
        let e = parse_str("hold --udp 127.0.0.1:9").unwrap_err();
        assert!(e.contains("hold mode needs --tcp or --unix"), "{e}");
    }

    #[test]
    fn source_addresses_rotate() {
        let c = parse_str("connect --tcp 127.0.0.1:9 --src-ips 3")
            .unwrap()
            .unwrap();
        let got: Vec<_> = (0..4).map(|n| c.source(n).unwrap().octets()[3]).collect();
        assert_eq!(got, [1, 2, 3, 1]);
        let c = parse_str("connect --tcp [::1]:9 --src-ips 3")
            .unwrap()
            .unwrap();
        assert_eq!(c.source(0), None, "IPv6 targets keep the kernel's choice");
    }
}
