//! The TOML configuration: schema, defaults, and validation.
//!
//! Pure data: parsing has no side effects (nothing is bound, created or
//! forked here), and this module knows nothing of plugins, the master or
//! the workers. Which plugin a service runs, and whether it serves the
//! service's sockets, is decided after parsing by src/resolve.rs. Every
//! error, whether the TOML parser found it or a semantic check did
//! (duplicate names, an address in use twice), is one [`ConfigError`] that
//! names the file, line and column and says what was expected.
//!
//! Owns: the text a [`Config`] was parsed from (so that later steps can
//! locate a span in it without reading the file again).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::acl::{self, Acl};
use crate::proxy::{self, Proxy};

/// The embedded default configuration (`config/default.toml`): echo on
/// `tcp://127.0.0.1:8009` with two workers.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/default.toml");

/// The largest pool: `workers`, `max_workers`, SIGTTIN and `scale` stop
/// here (a bound on fork bombs by typo, and what the scoreboard is sized
/// for).
pub const MAX_WORKERS: u32 = 4096;

/// What the configuration was read from; used in error messages and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The file given with `--config`.
    File(PathBuf),
    /// [`EMBEDDED_DEFAULT`], compiled into the binary.
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("<embedded default>"),
        }
    }
}

/// A configuration error, located in its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read config file: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file was read, and something in it is wrong.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        /// Where the configuration came from.
        origin: Source,
        /// 1-based line of the offending value.
        line: usize,
        /// 1-based column (in characters) of the offending value.
        column: usize,
        /// What is wrong and what was expected, on one line.
        message: String,
    },
}

/// The whole configuration, with defaults filled in.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The control socket.
    #[serde(default)]
    pub control: ControlConfig,
    /// The Prometheus endpoint (absent: none).
    #[serde(default, skip_serializing_if = "MetricsConfig::is_unset")]
    pub metrics: MetricsConfig,
    /// The `[[service]]` pools; at least one.
    #[serde(rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// Where this configuration was read from.
    #[serde(skip, default = "embedded")]
    pub source: Source,
    /// The text it was parsed from, to locate spans in errors found later
    /// ([`Config::error_at`]).
    #[serde(skip)]
    text: Arc<str>,
}

fn embedded() -> Source {
    Source::Embedded
}

/// `[daemon]`: settings of the master process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where the master writes its pid (removed on exit). None: no pid file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// How long a binary upgrade may take: the new master must have its
    /// first generation ready within it, or the old master kills it and
    /// carries on.
    #[serde(default = "sixty_seconds", with = "nonzero_duration")]
    pub upgrade_timeout: Duration,
    /// On SIGTERM (or `preforkd stop`), how long the daemon reports itself
    /// not ready (`/ready`, status, sd_notify) while it keeps serving,
    /// before the graceful stop begins: the time a load balancer takes to
    /// see it and send no more clients. SIGINT/SIGQUIT skip it.
    #[serde(default, with = "duration")]
    pub shutdown_delay: Duration,
    /// The user the workers run as (a name). None: they keep the master's
    /// credentials. The master itself keeps its privileges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Spanned<String>>,
    /// The workers' group (a name); defaults to `user`'s primary group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Spanned<String>>,
    /// `user` and `group` resolved by validation.
    #[serde(skip)]
    pub credentials: Option<Credentials>,
}

/// What workers drop to: `[daemon] user` and `group`, resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user's name, for messages.
    pub user: String,
    /// Its uid.
    pub uid: nix::unistd::Uid,
    /// `group`'s gid, or the user's primary group's.
    pub gid: nix::unistd::Gid,
    /// The supplementary groups: the user's groups (from the group
    /// database) plus `gid`.
    pub groups: Vec<nix::unistd::Gid>,
}

impl Default for DaemonConfig {
    fn default() -> DaemonConfig {
        DaemonConfig {
            pid_file: None,
            upgrade_timeout: sixty_seconds(),
            shutdown_delay: Duration::ZERO,
            user: None,
            group: None,
            credentials: None,
        }
    }
}

impl DaemonConfig {
    /// Looks `user` and `group` up in the user and group databases (reads
    /// only: nothing changes here).
    fn resolve(&self) -> Result<Option<Credentials>, (std::ops::Range<usize>, String)> {
        use nix::unistd::{Group, User};
        let Some(user) = &self.user else {
            if let Some(group) = &self.group {
                return Err((
                    group.span(),
                    "group needs a user: set [daemon] user as well".into(),
                ));
            }
            return Ok(None);
        };
        let name = user.get_ref();
        let found = User::from_name(name)
            .map_err(|e| (user.span(), format!("cannot look up user {name:?}: {e}")))?
            .ok_or_else(|| {
                (
                    user.span(),
                    format!("unknown user {name:?}: expected a user of this system"),
                )
            })?;
        let gid = match &self.group {
            None => found.gid,
            Some(group) => {
                let gname = group.get_ref();
                Group::from_name(gname)
                    .map_err(|e| (group.span(), format!("cannot look up group {gname:?}: {e}")))?
                    .ok_or_else(|| {
                        (
                            group.span(),
                            format!("unknown group {gname:?}: expected a group of this system"),
                        )
                    })?
                    .gid
            }
        };
        let cname = std::ffi::CString::new(name.as_str())
            .map_err(|_| (user.span(), format!("invalid user name {name:?}")))?;
        let mut groups = nix::unistd::getgrouplist(&cname, gid).map_err(|e| {
            (
                user.span(),
                format!("cannot list the groups of user {name:?}: {e}"),
            )
        })?;
        groups.sort_unstable_by_key(|g| g.as_raw());
        groups.dedup();
        Ok(Some(Credentials {
            user: name.clone(),
            uid: found.uid,
            gid,
            groups,
        }))
    }
}

/// `[metrics]`: the Prometheus text endpoint, served by a child process
/// of its own (see [`crate::metrics`]).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `"HOST:PORT"` (or `"tcp://HOST:PORT"`) to serve `GET /metrics` on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Spanned<String>>,
    /// `listen`, parsed (filled in by validation).
    #[serde(skip)]
    pub addr: Option<SocketAddr>,
}

impl MetricsConfig {
    fn is_unset(&self) -> bool {
        self.listen.is_none()
    }

    /// The address as a listener address, if one is configured.
    pub fn listen_addr(&self) -> Option<ListenAddr> {
        self.addr.map(ListenAddr::Tcp)
    }

    /// The key naming the metrics socket across reloads and upgrades.
    pub fn listen_key(&self) -> Option<String> {
        self.addr.map(|a| {
            if a.port() == 0 {
                format!("metrics:tcp://{a} (port 0)")
            } else {
                format!("metrics:tcp://{a}")
            }
        })
    }
}

/// `[control]`: the master's control socket (`preforkd status`, `reload`, ...).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// A Unix stream socket the master creates with mode 0600. None: no
    /// control socket; the CLI falls back to the pid file and signals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<Spanned<PathBuf>>,
}

impl ControlConfig {
    /// The socket's path, if one is configured.
    pub fn path(&self) -> Option<&Path> {
        self.socket.as_ref().map(|s| s.get_ref().as_path())
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Where log lines go.
    #[serde(default = "default_log_target")]
    pub target: Spanned<LogTarget>,
    /// The least severe level that is written.
    #[serde(default)]
    pub level: LogLevel,
    /// The log file, for `target = "file"` (required there, ignored
    /// otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<Spanned<PathBuf>>,
    /// Where syslog records go, for `target = "syslog"`.
    #[serde(default)]
    pub syslog: SyslogAddr,
    /// The syslog record format.
    #[serde(default)]
    pub syslog_format: SyslogFormat,
    /// The syslog facility.
    #[serde(default)]
    pub facility: Facility,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            target: default_log_target(),
            level: LogLevel::default(),
            file: None,
            syslog: SyslogAddr::default(),
            syslog_format: SyslogFormat::default(),
            facility: Facility::default(),
        }
    }
}

impl LogConfig {
    /// The configured target.
    pub fn target(&self) -> LogTarget {
        *self.target.get_ref()
    }

    /// The log file's path, if one is configured.
    pub fn file_path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.get_ref().as_path())
    }

    /// Whether `other` logs to the same place in the same form (everything
    /// but the level, which a reload applies at once).
    pub fn same_target(&self, other: &LogConfig) -> bool {
        self.target() == other.target()
            && self.file_path() == other.file_path()
            && self.syslog == other.syslog
            && self.syslog_format == other.syslog_format
            && self.facility == other.facility
    }
}

fn default_log_target() -> Spanned<LogTarget> {
    Spanned::new(0..0, LogTarget::Stderr)
}

/// `[log] target`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    /// Standard error, one line per record: timestamped, or with `<N>`
    /// priority prefixes when it is a journald stream.
    #[default]
    Stderr,
    /// A syslog daemon: the local socket or a remote address.
    Syslog,
    /// A file, opened for appending and reopened on SIGUSR1.
    File,
}

/// `[log] syslog`: where syslog records are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogAddr {
    /// `unix:PATH`: a local Unix datagram socket (default `/dev/log`).
    Unix(PathBuf),
    /// `udp://HOST:PORT`.
    Udp(String),
    /// `tcp://HOST:PORT` (RFC 6587 framing).
    Tcp(String),
}

impl Default for SyslogAddr {
    fn default() -> SyslogAddr {
        SyslogAddr::Unix(PathBuf::from("/dev/log"))
    }
}

impl fmt::Display for SyslogAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyslogAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            SyslogAddr::Udp(a) => write!(f, "udp://{a}"),
            SyslogAddr::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl FromStr for SyslogAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected unix:PATH, udp://HOST:PORT or tcp://HOST:PORT";
        let host_port = |rest: &str| -> Result<String, String> {
            let ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if ok {
                Ok(rest.to_string())
            } else {
                Err(format!(
                    "invalid syslog address {s:?}: expected HOST:PORT after the scheme, with a port from 1 to 65535"
                ))
            }
        };
        if let Some(rest) = s.strip_prefix("udp://") {
            Ok(SyslogAddr::Udp(host_port(rest)?))
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            Ok(SyslogAddr::Tcp(host_port(rest)?))
        } else if let Some(rest) = s.strip_prefix("unix:") {
            if rest.is_empty() || rest.len() > MAX_UNIX_PATH || rest.contains('\0') {
                return Err(format!(
                    "invalid syslog address {s:?}: expected a socket path of 1 to {MAX_UNIX_PATH} bytes"
                ));
            }
            Ok(SyslogAddr::Unix(PathBuf::from(rest)))
        } else {
            Err(format!("invalid syslog address {s:?}: {EXPECTED}"))
        }
    }
}

impl Serialize for SyslogAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SyslogAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// `[log] syslog_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    /// BSD syslog: `<PRI>Mmm dd hh:mm:ss [HOST ]preforkd[PID]: MSG`.
    #[default]
    Rfc3164,
    /// `<PRI>1 TIMESTAMP HOST preforkd PID - - MSG`.
    Rfc5424,
}

/// `[log] facility`: one of the syslog facility names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facility(u8);

impl Facility {
    /// The names, in code order (kern = 0 ... local7 = 23; 12 to 15 have
    /// no common name and are not offered).
    const NAMES: [(&'static str, u8); 20] = [
        ("kern", 0),
        ("user", 1),
        ("mail", 2),
        ("daemon", 3),
        ("auth", 4),
        ("syslog", 5),
        ("lpr", 6),
        ("news", 7),
        ("uucp", 8),
        ("cron", 9),
        ("authpriv", 10),
        ("ftp", 11),
        ("local0", 16),
        ("local1", 17),
        ("local2", 18),
        ("local3", 19),
        ("local4", 20),
        ("local5", 21),
        ("local6", 22),
        ("local7", 23),
    ];

    /// The facility code (0 to 23); the PRI of a record is code * 8 + severity.
    pub fn code(self) -> u8 {
        self.0
    }

    /// Its name, as written in the config.
    pub fn name(self) -> &'static str {
        Facility::NAMES
            .iter()
            .find(|(_, c)| *c == self.0)
            .map(|(n, _)| *n)
            .expect("only known codes are built")
    }
}

impl Default for Facility {
    fn default() -> Facility {
        Facility(3)
    }
}

impl FromStr for Facility {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Facility::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, c)| Facility(*c))
            .ok_or_else(|| {
                let names: Vec<&str> = Facility::NAMES.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown syslog facility {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl Serialize for Facility {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Facility {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// `[log] level`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default: lifecycle events (spawns, exits, signals).
    #[default]
    Info,
    /// Per-connection events too.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// One `[[service]]`: a pool of workers running one handler plugin on one or
/// more listeners.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name, used in process titles and logs.
    pub name: Spanned<ServiceName>,
    /// Where to listen, as written; at least one address.
    pub listen: Spanned<Vec<Spanned<String>>>,
    /// `listen`, parsed (filled in by validation).
    #[serde(skip)]
    pub addrs: Vec<ListenAddr>,
    /// Pool size: a number or `"auto"` (one per CPU).
    #[serde(default)]
    pub workers: Workers,
    /// `threads` as written: its span locates errors found later (the file
    /// descriptor limit, src/resolve.rs).
    #[serde(rename = "threads", default = "one_written")]
    pub threads_written: Spanned<i64>,
    /// Accept threads in each worker (socketserver's ThreadingMixIn):
    /// `threads`, checked (filled in by validation).
    #[serde(skip)]
    pub threads: u32,
    /// How a worker serves: a thread per connection, or one event loop
    /// for many (`"threads"`, the default, or `"async"`).
    #[serde(default = "threads_mode")]
    pub mode: Spanned<WorkerMode>,
    /// `worker_connections` as written (its span locates the file
    /// descriptor check, src/resolve.rs); absent: the default.
    #[serde(
        rename = "worker_connections",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub worker_connections_written: Option<Spanned<i64>>,
    /// `mode = "async"`: the most connections one worker serves at once
    /// (nginx's and gunicorn's setting of that name), checked; 0 in
    /// threads mode (filled in by validation).
    #[serde(skip)]
    pub worker_connections: u32,
    /// Recycle a worker after this many connections (datagrams); 0 = never.
    #[serde(default)]
    pub max_requests: u64,
    /// Add a random 0..=jitter to `max_requests` per worker, so that workers
    /// do not all recycle at once.
    #[serde(default)]
    pub max_requests_jitter: u64,
    /// Recycle a worker whose resident memory passes this (checked about
    /// once a second by the master); 0 = never. A replacement is started
    /// first, then the worker leaves after its current connection.
    #[serde(default)]
    pub max_memory: ByteSize,
    /// Add a random 0..=jitter to `max_memory` per worker.
    #[serde(default)]
    pub max_memory_jitter: ByteSize,
    /// Recycle a worker this long after it started ("0s" = never), with a
    /// replacement started first, like `max_memory`.
    #[serde(default, with = "duration")]
    pub max_age: Duration,
    /// Add a random 0..=jitter to `max_age` per worker.
    #[serde(default, with = "duration")]
    pub max_age_jitter: Duration,
    /// How the pool's size is managed: fixed (`workers`), between spare
    /// bounds, or on demand.
    #[serde(default = "static_pool")]
    pub pool: Spanned<PoolKind>,
    /// `pool = "dynamic"`: fewest idle workers to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_spare: Option<Spanned<u32>>,
    /// `pool = "dynamic"`: most idle workers to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_spare: Option<Spanned<u32>>,
    /// `pool = "dynamic"` or `"ondemand"`: the most workers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<Spanned<u32>>,
    /// `pool = "ondemand"`: a worker idle this long is retired.
    #[serde(default = "ten_seconds", with = "nonzero_duration")]
    pub idle_worker_timeout: Duration,
    /// How long a stopping worker may take to finish its connections before it
    /// is killed.
    #[serde(default = "thirty_seconds", with = "duration")]
    pub graceful_timeout: Duration,
    /// How long a new worker may take to initialise its handler.
    #[serde(default = "thirty_seconds", with = "nonzero_duration")]
    pub ready_timeout: Duration,
    /// A worker busy on one connection (or datagram) longer than this, or
    /// whose heartbeat stops this long, is sent SIGABRT, then SIGKILL, and
    /// replaced ("0s", the default: never).
    #[serde(default, with = "duration")]
    pub timeout: Duration,
    /// A connection whose handler waits this long for input that does not
    /// come is closed ("0s", the default: never). `read_timeout` is another
    /// name for it.
    #[serde(default, with = "duration", alias = "read_timeout")]
    pub idle_timeout: Duration,
    /// Peers refused if one of these matches (see [`crate::acl`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Spanned<String>>,
    /// If not empty, peers refused unless one of these matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Spanned<String>>,
    /// `allow` and `deny`, compiled (filled in by validation).
    #[serde(skip)]
    pub acl: Acl,
    /// Most connections from one IP address at once, across the service's
    /// workers (0, the default: no limit).
    #[serde(default)]
    pub max_connections_per_ip: u32,
    /// Each stream connection starts with a PROXY protocol header of this
    /// version (see [`crate::proxy`]); None, the default: no header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<Spanned<proxy::Version>>,
    /// The peers that may send that header (addresses or ranges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_from: Vec<Spanned<String>>,
    /// Both, compiled (filled in by validation).
    #[serde(skip)]
    pub proxy: Option<Proxy>,
    /// listen(2) backlog of stream sockets.
    #[serde(default = "default_backlog", deserialize_with = "de_backlog")]
    pub backlog: i32,
    /// Permissions of the Unix socket files this service creates.
    #[serde(default)]
    pub socket_mode: SocketMode,
    /// The handler plugin and its options.
    pub handler: HandlerConfig,
}

impl ServiceConfig {
    /// The pool kind.
    pub fn pool_kind(&self) -> PoolKind {
        *self.pool.get_ref()
    }

    /// How many workers the pool starts with: `workers` for a static pool,
    /// `workers` clamped to `min_spare..=max_workers` for a dynamic one
    /// (PHP-FPM's `pm.start_servers`), none for an ondemand one.
    pub fn start_workers(&self) -> u32 {
        match self.pool_kind() {
            PoolKind::Static => self.workers.resolve(),
            PoolKind::Dynamic => {
                let (min, _, max) = self.pool_bounds();
                self.workers.resolve().clamp(min.max(1), max.max(1))
            }
            PoolKind::Ondemand => 0,
        }
    }

    /// `(min_spare, max_spare, max_workers)` (zeros where not set; a
    /// validated dynamic or ondemand pool has what it needs).
    pub fn pool_bounds(&self) -> (u32, u32, u32) {
        let v = |o: &Option<Spanned<u32>>| o.as_ref().map_or(0, |s| *s.get_ref());
        (v(&self.min_spare), v(&self.max_spare), v(&self.max_workers))
    }

    /// The worker mode.
    pub fn mode(&self) -> WorkerMode {
        *self.mode.get_ref()
    }

    /// The most connections one worker serves at once: its threads, or
    /// `worker_connections` in async mode.
    pub fn connections_per_worker(&self) -> u32 {
        match self.mode() {
            WorkerMode::Threads => self.threads,
            WorkerMode::Async => self.worker_connections,
        }
    }

    /// The span `worker_connections` (else `mode`) was written at, for
    /// errors about the connections a worker holds.
    pub fn connections_span(&self) -> std::ops::Range<usize> {
        match self.mode() {
            WorkerMode::Threads => self.threads_written.span(),
            WorkerMode::Async => self
                .worker_connections_written
                .as_ref()
                .map_or_else(|| self.mode.span(), |w| w.span()),
        }
    }

    /// Checks `mode` against `threads` and `worker_connections`, and
    /// fills in `worker_connections`.
    /// `proxy_protocol` and `proxy_from`, compiled: both or neither, and
    /// only on stream listeners.
    fn validate_proxy(&self) -> Result<Option<Proxy>, (std::ops::Range<usize>, String)> {
        let name = self.name.get_ref().as_str();
        let Some(version) = &self.proxy_protocol else {
            return match self.proxy_from.first() {
                Some(f) => Err((
                    f.span(),
                    format!(
                        "service {name:?}: proxy_from without proxy_protocol: add proxy_protocol = \"v2\" (or \"v1\", \"any\"), or remove proxy_from"
                    ),
                )),
                None => Ok(None),
            };
        };
        if let Some((i, a)) = self
            .addrs
            .iter()
            .enumerate()
            .find(|(_, a)| !a.is_stream() && a.systemd_name().is_none())
        {
            return Err((
                self.listen.get_ref()[i].span(),
                format!(
                    "service {name:?}: proxy_protocol is for stream listeners, and {a} is a datagram socket: give it a service of its own"
                ),
            ));
        }
        let from = self
            .proxy_from
            .iter()
            .map(|f| {
                let s = f.get_ref().as_str();
                match s.parse::<acl::Rule>() {
                    Ok(acl::Rule::Net(net)) => Ok(net),
                    Ok(_) => Err(format!("{s:?} is not an IP address or range")),
                    Err(e) => Err(e),
                }
                .map_err(|e| (f.span(), format!("service {name:?}: proxy_from: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inet = self
            .addrs
            .iter()
            .any(|a| matches!(a, ListenAddr::Tcp(_)) || a.systemd_name().is_some());
        if from.is_empty() && inet {
            return Err((
                version.span(),
                format!(
                    "service {name:?}: proxy_protocol needs proxy_from, the addresses of the load balancers that send the header, e.g. proxy_from = [\"10.0.0.0/8\"]"
                ),
            ));
        }
        Ok(Some(Proxy {
            version: *version.get_ref(),
            from,
        }))
    }

    fn validate_mode(&mut self) -> Result<(), (std::ops::Range<usize>, String)> {
        let name = self.name.get_ref().as_str();
        let threads_written = self.threads_written.span() != (0..0);
        match (self.mode(), &self.worker_connections_written) {
            (WorkerMode::Threads, Some(w)) => Err((
                w.span(),
                format!(
                    "service {name:?}: worker_connections applies to mode = \"async\": remove it, or set mode = \"async\" (threads mode serves `threads` connections per worker)"
                ),
            )),
            (WorkerMode::Threads, None) => {
                self.worker_connections = 0;
                Ok(())
            }
            (WorkerMode::Async, _) if threads_written => Err((
                self.threads_written.span(),
                format!(
                    "service {name:?}: threads applies to mode = \"threads\": an async worker serves its connections from one event loop; remove threads (and set worker_connections)"
                ),
            )),
            (WorkerMode::Async, None) => {
                self.worker_connections = DEFAULT_WORKER_CONNECTIONS;
                Ok(())
            }
            (WorkerMode::Async, Some(w)) => {
                let n = *w.get_ref();
                if !(1..=MAX_WORKER_CONNECTIONS).contains(&n) {
                    return Err((
                        w.span(),
                        format!(
                            "service {name:?}: worker_connections must be between 1 and {MAX_WORKER_CONNECTIONS}, got {n}"
                        ),
                    ));
                }
                self.worker_connections = n as u32;
                Ok(())
            }
        }
    }

    /// Checks the pool keys against each other; the span of what is wrong.
    fn validate_pool(&self) -> Result<(), (std::ops::Range<usize>, String)> {
        let name = self.name.get_ref().as_str();
        let kind = self.pool_kind();
        let pool_span = self.pool.span();
        let named = [
            ("min_spare", &self.min_spare),
            ("max_spare", &self.max_spare),
            ("max_workers", &self.max_workers),
        ];
        for (key, value) in named {
            let Some(v) = value else { continue };
            let allowed = match kind {
                PoolKind::Static => false,
                PoolKind::Dynamic => true,
                PoolKind::Ondemand => key == "max_workers",
            };
            if !allowed {
                return Err((
                    v.span(),
                    format!(
                        "service {name:?}: {key} does not apply to pool = \"{kind}\": remove it, or set pool = \"dynamic\"{}",
                        if key == "max_workers" {
                            " or \"ondemand\""
                        } else {
                            ""
                        }
                    ),
                ));
            }
            if !(1..=MAX_WORKERS).contains(v.get_ref()) {
                return Err((
                    v.span(),
                    format!(
                        "service {name:?}: {key} = {}: expected a number from 1 to {MAX_WORKERS}",
                        v.get_ref()
                    ),
                ));
            }
        }
        match kind {
            PoolKind::Static => Ok(()),
            PoolKind::Dynamic => {
                let (Some(min), Some(max), Some(top)) =
                    (&self.min_spare, &self.max_spare, &self.max_workers)
                else {
                    return Err((
                        pool_span,
                        format!(
                            "service {name:?}: pool = \"dynamic\" needs min_spare, max_spare and max_workers, e.g. min_spare = 2, max_spare = 8, max_workers = 32"
                        ),
                    ));
                };
                if min.get_ref() > max.get_ref() {
                    return Err((
                        min.span(),
                        format!(
                            "service {name:?}: min_spare = {} is more than max_spare = {}: expected min_spare <= max_spare",
                            min.get_ref(),
                            max.get_ref()
                        ),
                    ));
                }
                if max.get_ref() > top.get_ref() {
                    return Err((
                        max.span(),
                        format!(
                            "service {name:?}: max_spare = {} is more than max_workers = {}: expected max_spare <= max_workers",
                            max.get_ref(),
                            top.get_ref()
                        ),
                    ));
                }
                if let Workers::Count(n) = self.workers
                    && !(*min.get_ref()..=*top.get_ref()).contains(&n.get())
                {
                    return Err((
                        pool_span,
                        format!(
                            "service {name:?}: workers = {n} (the dynamic pool's start size) is outside min_spare..=max_workers ({}..={}): change workers",
                            min.get_ref(),
                            top.get_ref()
                        ),
                    ));
                }
                Ok(())
            }
            PoolKind::Ondemand => {
                if self.max_workers.is_none() {
                    return Err((
                        pool_span,
                        format!(
                            "service {name:?}: pool = \"ondemand\" needs max_workers, e.g. max_workers = 16"
                        ),
                    ));
                }
                if let Workers::Count(n) = self.workers {
                    return Err((
                        pool_span,
                        format!(
                            "service {name:?}: workers = {n} does not apply to pool = \"ondemand\", which starts with none: remove it (max_workers bounds the pool)"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Each listen address with the key that names its socket across
    /// reloads and binary upgrades: the address as written, or, for a port
    /// 0 address (a socket of its own each time it is written), the address
    /// with the service name and its place in the list.
    pub fn listen_keys(&self) -> Vec<(String, ListenAddr)> {
        self.addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let key = match a {
                    ListenAddr::Tcp(sa) | ListenAddr::Udp(sa) if sa.port() == 0 => {
                        format!("{a} ({}#{i})", self.name.get_ref())
                    }
                    _ => a.to_string(),
                };
                (key, a.clone())
            })
            .collect()
    }
}

/// `[service.handler]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// A name in the plugin registry.
    pub plugin: Spanned<String>,
    /// Passed to the plugin when a worker initialises it.
    #[serde(default)]
    pub options: toml::Table,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn static_pool() -> Spanned<PoolKind> {
    Spanned::new(0..0, PoolKind::Static)
}

fn threads_mode() -> Spanned<WorkerMode> {
    Spanned::new(0..0, WorkerMode::Threads)
}

/// `mode`: how a worker serves its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerMode {
    /// `threads` accept threads, each serving one connection at a time
    /// (socketserver's ThreadingMixIn).
    #[default]
    Threads,
    /// One event loop serving up to `worker_connections` connections at
    /// once (gevent's server; nginx's and gunicorn's async workers).
    Async,
}

impl fmt::Display for WorkerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerMode::Threads => "threads",
            WorkerMode::Async => "async",
        })
    }
}

/// `pool`: how a service's pool size is managed (PHP-FPM's `pm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// `workers` workers, always (scaled by hand with `scale`, SIGTTIN/TTOU).
    #[default]
    Static,
    /// Between `min_spare` and `max_spare` idle workers, at most
    /// `max_workers` in all; starts with `workers`.
    Dynamic,
    /// None until connections wait; at most `max_workers`; a worker idle
    /// for `idle_worker_timeout` is retired.
    Ondemand,
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolKind::Static => "static",
            PoolKind::Dynamic => "dynamic",
            PoolKind::Ondemand => "ondemand",
        })
    }
}

/// A size in bytes, written `"256MiB"`, `"512M"`, `"1G"`, `"64KiB"`,
/// `"1000000"` or as a plain integer. K, M, G, T and KiB, MiB, GiB, TiB are
/// powers of 1024 (as in systemd and nginx); KB, MB, GB, TB powers of 1000.
/// 0 means unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid size {s:?}: expected a number with an optional unit, such as \"256MiB\", \"512M\", \"1G\" or \"800MB\""
            )
        };
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "k" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        let value: f64 = number.parse().map_err(|_| bad())?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {n} is negative: expected bytes >= 0")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn sixty_seconds() -> Duration {
    Duration::from_secs(60)
}
fn default_backlog() -> i32 {
    1024
}

fn one_written() -> Spanned<i64> {
    Spanned::new(0..0, 1)
}

/// The most accept threads a worker runs.
pub const MAX_THREADS: i64 = 1024;
/// `worker_connections` when not written (nginx's and gunicorn's default).
pub const DEFAULT_WORKER_CONNECTIONS: u32 = 1024;
/// The most connections one event-driven worker serves (the file
/// descriptor limit usually says less; src/resolve.rs checks it).
pub const MAX_WORKER_CONNECTIONS: i64 = 1 << 20;

fn de_backlog<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=65535).contains(&n) {
        return Err(de::Error::custom(format!(
            "backlog must be between 1 and 65535, got {n}"
        )));
    }
    Ok(n as i32)
}

/// A service name: letters, digits, `-`, `_` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

impl ServiceName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(de::Error::custom(format!(
                "invalid service name {s:?}: expected 1 to 64 letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(ServiceName(s))
    }
}

/// `workers`: a fixed count or one per CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One worker per online CPU.
    #[default]
    Auto,
    /// Exactly this many.
    Count(NonZeroU32),
}

impl Workers {
    /// The number of workers this setting means on this machine.
    pub fn resolve(self) -> u32 {
        match self {
            Workers::Count(n) => n.get(),
            Workers::Auto => std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        }
    }
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u32(n.get()),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a number of workers from 1 to {MAX_WORKERS}, or \"auto\""
                )
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Workers, E> {
                if n == 0 {
                    return Err(E::custom(
                        "workers = 0: a service needs at least 1 worker (or \"auto\")",
                    ));
                }
                match u32::try_from(n).ok().filter(|n| *n <= MAX_WORKERS) {
                    Some(n) => Ok(Workers::Count(NonZeroU32::new(n).expect("n > 0"))),
                    None => Err(E::custom(format!(
                        "workers = {n}: expected a number from 1 to {MAX_WORKERS}, or \"auto\""
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Workers, E> {
                if s == "auto" {
                    Ok(Workers::Auto)
                } else {
                    Err(E::custom(format!(
                        "workers = {s:?}: expected a number from 1 to {MAX_WORKERS}, or \"auto\""
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `socket_mode`: permission bits of Unix socket files, written `"0660"` or `0o660`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(0o660)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SocketMode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an octal mode such as \"0660\" or 0o660")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<SocketMode, E> {
                if (0..=0o777).contains(&n) {
                    Ok(SocketMode(n as u32))
                } else {
                    Err(E::custom(format!(
                        "socket_mode {n:#o} is out of range: expected 0o000 to 0o777"
                    )))
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<SocketMode, E> {
                let digits = s.strip_prefix("0o").unwrap_or(s);
                match u32::from_str_radix(digits, 8) {
                    Ok(n) if n <= 0o777 && !digits.is_empty() => Ok(SocketMode(n)),
                    _ => Err(E::custom(format!(
                        "socket_mode {s:?}: expected an octal mode such as \"0660\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Durations written as strings such as `"30s"`, `"1m 30s"` or `"250ms"`.
mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// The longest duration any setting takes: a day. It keeps every
    /// `Instant + duration` the master computes far from overflow.
    pub const MAX: Duration = Duration::from_secs(24 * 3600);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        let v = humantime::parse_duration(&s).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {s:?} ({e}): expected a string such as \"30s\", \"1m 30s\" or \"250ms\""
            ))
        })?;
        if v > MAX {
            return Err(de::Error::custom(format!(
                "duration {s:?} is too long: expected at most \"24h\""
            )));
        }
        Ok(v)
    }
}

/// Like [`duration`], but zero is an error (a timeout that always expires).
mod nonzero_duration {
    use super::*;

    pub use super::duration::serialize;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = super::duration::deserialize(d)?;
        if v.is_zero() {
            return Err(de::Error::custom(
                "a zero timeout would always expire: expected a duration such as \"30s\"",
            ));
        }
        Ok(v)
    }
}

/// One entry of a service's `listen` list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `tcp://HOST:PORT`: a TCP stream socket (socketserver's TCPServer).
    Tcp(SocketAddr),
    /// `udp://HOST:PORT`: a UDP socket (UDPServer).
    Udp(SocketAddr),
    /// `unix:PATH`: a Unix stream socket (UnixStreamServer).
    Unix(PathBuf),
    /// `unixgram:PATH`: a Unix datagram socket (UnixDatagramServer).
    UnixGram(PathBuf),
    /// `systemd:NAME`: a socket passed by systemd (socket activation),
    /// matched against its `FileDescriptorName=`. Its kind (stream or
    /// datagram, inet or Unix) is the socket's own, known only at start.
    Systemd(String),
}

/// Longest Unix socket path: `sun_path` holds 108 bytes including the NUL.
pub const MAX_UNIX_PATH: usize = 107;

impl ListenAddr {
    /// True for connection-oriented sockets (tcp, unix).
    pub fn is_stream(&self) -> bool {
        matches!(self, ListenAddr::Tcp(_) | ListenAddr::Unix(_))
    }

    /// The `FileDescriptorName=` of a `systemd:NAME` entry.
    pub fn systemd_name(&self) -> Option<&str> {
        match self {
            ListenAddr::Systemd(n) => Some(n),
            _ => None,
        }
    }

    /// A key under which two entries conflict; None for port 0, which asks
    /// the kernel for a fresh port each time. A Unix path is one file
    /// whatever the socket type (`unix:` and `unixgram:` conflict), and
    /// `a//b` or `a/./b` name the same file as `a/b`.
    fn conflict_key(&self) -> Option<String> {
        match self {
            ListenAddr::Tcp(a) | ListenAddr::Udp(a) if a.port() == 0 => None,
            ListenAddr::Unix(p) | ListenAddr::UnixGram(p) => Some(format!(
                "path {}",
                p.components().collect::<PathBuf>().display()
            )),
            ListenAddr::Systemd(n) => Some(format!("systemd socket {n:?}")),
            _ => Some(self.to_string()),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddr::Udp(a) => write!(f, "udp://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::UnixGram(p) => write!(f, "unixgram:{}", p.display()),
            ListenAddr::Systemd(n) => write!(f, "systemd:{n}"),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected tcp://HOST:PORT, udp://HOST:PORT, unix:PATH, unixgram:PATH or systemd:NAME, \
             with HOST an IP address such as 127.0.0.1 or [::1]";
        let inet = |rest: &str| -> Result<SocketAddr, String> {
            rest.parse::<SocketAddr>()
                .map_err(|_| format!("invalid listen address {s:?}: {EXPECTED}"))
        };
        let path = |rest: &str| -> Result<PathBuf, String> {
            if rest.is_empty() {
                return Err(format!("invalid listen address {s:?}: the path is empty"));
            }
            if rest.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "invalid listen address {s:?}: a Unix socket path can have at most {MAX_UNIX_PATH} bytes, this one has {}",
                    rest.len()
                ));
            }
            if rest.contains('\0') {
                return Err(format!("invalid listen address {s:?}: NUL in path"));
            }
            Ok(PathBuf::from(rest))
        };
        if let Some(rest) = s.strip_prefix("tcp://") {
            Ok(ListenAddr::Tcp(inet(rest)?))
        } else if let Some(rest) = s.strip_prefix("udp://") {
            Ok(ListenAddr::Udp(inet(rest)?))
        } else if let Some(rest) = s.strip_prefix("unixgram:") {
            Ok(ListenAddr::UnixGram(path(rest)?))
        } else if let Some(rest) = s.strip_prefix("unix:") {
            Ok(ListenAddr::Unix(path(rest)?))
        } else if let Some(name) = s.strip_prefix("systemd:") {
            // sd_listen_fds_with_names(3): at most 255 printable ASCII
            // characters, no ':' (the separator of LISTEN_FDNAMES).
            if name.is_empty()
                || name.len() > 255
                || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            {
                return Err(format!(
                    "invalid listen address {s:?}: systemd:NAME needs the socket unit's FileDescriptorName=, 1 to 255 printable ASCII characters without ':' or spaces"
                ));
            }
            Ok(ListenAddr::Systemd(name.to_string()))
        } else {
            Err(format!("invalid listen address {s:?}: {EXPECTED}"))
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let source = Source::File(path.to_owned());
        match String::from_utf8(bytes) {
            Ok(text) => Config::parse(&text, source),
            Err(e) => {
                // Located at the first bad byte: the text before it is valid.
                let at = e.utf8_error().valid_up_to();
                let before = String::from_utf8_lossy(&e.as_bytes()[..at]).into_owned();
                Err(error_at(
                    &source,
                    &before,
                    at,
                    "invalid UTF-8: a config file is UTF-8 text; re-save it as UTF-8".into(),
                ))
            }
        }
    }

    /// The embedded default configuration.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, Source::Embedded)
    }

    /// Parses and validates `text`; `source` names it in errors.
    pub fn parse(text: &str, source: Source) -> Result<Config, ConfigError> {
        let locate = |span: Option<std::ops::Range<usize>>, message: String| {
            error_at(&source, text, span.map_or(0, |s| s.start), message)
        };
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let span = e.span();
            let message = readable(e.message().trim(), span.clone(), text);
            locate(span, message)
        })?;
        config.source = source.clone();
        config.text = text.into();
        config
            .validate_mut()
            .map_err(|(span, message)| locate(Some(span), message))?;
        Ok(config)
    }

    /// An error at byte `offset` of the text this config was parsed from
    /// (a span of one of its `Spanned` values), for checks made after
    /// parsing (src/resolve.rs).
    pub fn error_at(&self, offset: usize, message: String) -> ConfigError {
        error_at(&self.source, &self.text, offset, message)
    }

    /// Checks what serde cannot see: uniqueness across services, non-empty
    /// lists. Returns the span of the offending value.
    fn validate_mut(&mut self) -> Result<(), (std::ops::Range<usize>, String)> {
        for svc in &mut self.services {
            let threads = &svc.threads_written;
            if !(1..=MAX_THREADS).contains(threads.get_ref()) {
                return Err((
                    threads.span(),
                    format!(
                        "threads must be between 1 and {MAX_THREADS}, got {}",
                        threads.get_ref()
                    ),
                ));
            }
            svc.threads = *threads.get_ref() as u32;
            svc.validate_mode()?;
            svc.addrs = svc
                .listen
                .get_ref()
                .iter()
                .map(|a| a.get_ref().parse::<ListenAddr>().map_err(|e| (a.span(), e)))
                .collect::<Result<_, _>>()?;
            svc.acl = Acl::parse(
                svc.allow.iter().map(|r| r.get_ref().as_str()),
                svc.deny.iter().map(|r| r.get_ref().as_str()),
            )
            .map_err(|(is_allow, i, e)| {
                let list = if is_allow { &svc.allow } else { &svc.deny };
                (
                    list[i].span(),
                    format!(
                        "service {:?}: {}: {e}",
                        svc.name.get_ref().as_str(),
                        if is_allow { "allow" } else { "deny" }
                    ),
                )
            })?;
            svc.proxy = svc.validate_proxy()?;
        }
        self.daemon.credentials = self.daemon.resolve()?;
        if self.services.is_empty() {
            return Err((0..0, "no [[service]] defined: expected at least one".into()));
        }
        if self.log.target() == LogTarget::File && self.log.file.is_none() {
            return Err((
                self.log.target.span(),
                "target = \"file\" needs the file's path: file = \"/var/log/preforkd/preforkd.log\"".into(),
            ));
        }
        if let Some(file) = &self.log.file
            && file.get_ref().as_os_str().is_empty()
        {
            return Err((file.span(), "file is empty: expected a path".into()));
        }
        let mut names: HashMap<&str, ()> = HashMap::new();
        let mut addrs: HashMap<String, String> = HashMap::new();
        if let Some(socket) = &self.control.socket {
            let addr = format!("unix:{}", socket.get_ref().display())
                .parse::<ListenAddr>()
                .map_err(|e| (socket.span(), format!("control socket: {e}")))?;
            addrs.insert(
                addr.conflict_key().expect("a path"),
                "[control] socket".into(),
            );
        }
        if let Some(listen) = &self.metrics.listen {
            let text = listen.get_ref();
            let addr: SocketAddr = text
                .strip_prefix("tcp://")
                .unwrap_or(text)
                .parse()
                .map_err(|_| {
                    (
                        listen.span(),
                        format!(
                            "invalid metrics address {text:?}: expected HOST:PORT with HOST an IP address, such as \"127.0.0.1:9109\""
                        ),
                    )
                })?;
            self.metrics.addr = Some(addr);
            if let Some(key) = ListenAddr::Tcp(addr).conflict_key() {
                addrs.insert(key, "[metrics] listen".into());
            }
        }
        for svc in &self.services {
            let name = svc.name.get_ref().as_str();
            if names.insert(name, ()).is_some() {
                return Err((
                    svc.name.span(),
                    format!("duplicate service name {name:?}: each [[service]] needs its own name"),
                ));
            }
            if svc.listen.get_ref().is_empty() {
                return Err((
                    svc.listen.span(),
                    format!("service {name:?}: listen is empty: expected at least one address"),
                ));
            }
            for (addr, written) in svc.addrs.iter().zip(svc.listen.get_ref()) {
                if let Some(key) = addr.conflict_key()
                    && let Some(other) = addrs.insert(key, format!("service {name:?}"))
                {
                    return Err((
                        written.span(),
                        format!("duplicate listen address {addr}: already used by {other}"),
                    ));
                }
            }
            svc.validate_pool()?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, defaults filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config model always serializes")
    }
}

/// A [`ConfigError::Invalid`] at byte `offset` of `text`, its message on
/// one line with long quoted values cut.
fn error_at(source: &Source, text: &str, offset: usize, message: String) -> ConfigError {
    let (line, column) = line_col(text, offset);
    ConfigError::Invalid {
        origin: source.clone(),
        line,
        column,
        message: cut_long_values(&message.replace('\n', "; ")),
    }
}

/// The longest quoted value a message repeats whole.
const MAX_QUOTED: usize = 80;

/// Cuts every quoted value of more than [`MAX_QUOTED`] characters to its
/// start and end around `…`: the position says where the value is.
fn cut_long_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        // The closing quote: the next one not escaped.
        let close = rest
            .char_indices()
            .find(|&(i, c)| c == '"' && !rest[..i].ends_with('\\'))
            .map(|(i, _)| i);
        let Some(close) = close else { break };
        let value = &rest[..close];
        if value.chars().count() > MAX_QUOTED {
            let head: String = value.chars().take(MAX_QUOTED / 2).collect();
            let tail: Vec<char> = value.chars().rev().take(MAX_QUOTED / 4).collect();
            let tail: String = tail.into_iter().rev().collect();
            let n = value.chars().count();
            out.push_str(&format!("{head}…{tail}"));
            out.push('"');
            out.push_str(&format!(" ({n} characters)"));
        } else {
            out.push_str(value);
            out.push('"');
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// What the TOML parser said, in the words of the config: no Rust type
/// names, and a hint for the common slips.
fn readable(message: &str, span: Option<std::ops::Range<usize>>, text: &str) -> String {
    let at = span.map_or(0, |s| s.start).min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with("[service]") || line.starts_with("[ service ]") {
        return "[service] is one table, but services are a list: write [[service]] (two brackets) before each service".into();
    }
    if line.starts_with("handler") && message.contains("HandlerConfig") {
        let plugin = line
            .split_once('=')
            .map(|(_, v)| v.trim().trim_matches(['"', '\'']))
            .filter(|p| !p.is_empty())
            .unwrap_or("echo");
        return format!(
            "handler is a table, not a string: write [service.handler] on a line of its own, then plugin = \"{plugin}\" under it"
        );
    }
    let mut out = message.to_string();
    for (rust, words) in [
        ("struct HandlerConfig", "a [service.handler] table"),
        ("struct ServiceConfig", "a [[service]] table"),
        ("struct DaemonConfig", "a [daemon] table"),
        ("struct LogConfig", "a [log] table"),
        ("struct ControlConfig", "a [control] table"),
        ("struct MetricsConfig", "a [metrics] table"),
        ("struct Config", "a table"),
        ("a sequence", "a list [...]"),
        ("map", "table"),
        ("i64", "a whole number"),
        ("u64", "a whole number"),
        ("u32", "a whole number"),
        ("i32", "a whole number"),
    ] {
        out = replace_word(&out, rust, words);
    }
    out
}

/// Replaces `word` in `text` where it stands as a whole word.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before_ok = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        let after = &rest[i + word.len()..];
        let after_ok = after
            .chars()
            .next()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        out.push_str(&rest[..i]);
        out.push_str(if before_ok && after_ok { with } else { word });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Source::File("t.toml".into())).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0", "unix:/tmp/x.sock"]
workers = 3
[service.handler]
plugin = "echo"
"#;

    #[test]
    fn systemd_listen_entries() {
        let c = parse(&GOOD.replace("\"unix:/tmp/x.sock\"", "\"systemd:web\"")).unwrap();
        let s = &c.services[0];
        assert_eq!(s.addrs[1], ListenAddr::Systemd("web".into()));
        assert_eq!(s.listen_keys()[1].0, "systemd:web");
        assert_eq!(s.addrs[1].to_string(), "systemd:web");
        for bad in ["systemd:", "systemd:a:b", "systemd:a b"] {
            let e = parse(&GOOD.replace("unix:/tmp/x.sock", bad)).unwrap_err();
            assert!(e.contains("FileDescriptorName="), "{bad}: {e}");
        }
        let e =
            parse(&GOOD.replace("unix:/tmp/x.sock", "systemd:web\", \"systemd:web")).unwrap_err();
        assert!(e.contains("duplicate listen address systemd:web"), "{e}");
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = parse(GOOD).unwrap();
        let s = &c.services[0];
        assert_eq!(s.workers.resolve(), 3);
        assert_eq!(s.threads, 1);
        assert_eq!(s.graceful_timeout, Duration::from_secs(30));
        assert_eq!(s.backlog, 1024);
        assert_eq!(s.socket_mode, SocketMode(0o660));
        assert_eq!(c.log.level, LogLevel::Info);
    }

    #[test]
    fn embedded_default_is_echo_on_8009_with_two_workers() {
        let c = Config::embedded().unwrap();
        assert_eq!(c.services.len(), 1);
        let s = &c.services[0];
        assert_eq!(s.handler.plugin.get_ref(), "echo");
        assert_eq!(s.workers.resolve(), 2);
        assert_eq!(
            s.addrs,
            vec![ListenAddr::Tcp("127.0.0.1:8009".parse().unwrap())]
        );
    }

    #[test]
    fn reference_config_is_valid_and_shows_the_defaults() {
        let text = include_str!("../config/preforkd.toml");
        let c = parse(text).unwrap();
        let s = &c.services[0];
        assert_eq!(s.workers, Workers::Auto);
        assert_eq!(
            (s.threads, s.max_requests, s.max_requests_jitter),
            (1, 0, 0)
        );
        assert_eq!((s.backlog, s.socket_mode), (1024, SocketMode::default()));
        assert_eq!(s.graceful_timeout, Duration::from_secs(30));
        assert_eq!(s.ready_timeout, Duration::from_secs(30));
        assert_eq!(
            (c.log.target(), c.log.level, c.log.file_path()),
            (LogTarget::Stderr, LogLevel::Info, None)
        );
        assert_eq!(c.log.syslog, SyslogAddr::Unix("/dev/log".into()));
        assert_eq!(c.log.syslog_format, SyslogFormat::Rfc3164);
        assert_eq!(c.log.facility.name(), "daemon");
        assert_eq!(c.daemon.upgrade_timeout, Duration::from_secs(60));
        assert_eq!(c.control.path(), None);
    }

    #[test]
    fn print_config_round_trips() {
        let c = parse(GOOD).unwrap();
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err()
    }

    #[test]
    fn unknown_key_is_located() {
        let e = err(
            "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\nwrokers = 2\n[service.handler]\nplugin = \"echo\"\n",
        );
        assert!(e.starts_with("t.toml:4:1: unknown field `wrokers`"), "{e}");
    }

    #[test]
    fn control_socket_may_not_share_a_service_path() {
        let e = err(
            "[control]\nsocket = \"/run/x.sock\"\n[[service]]\nname = \"a\"\nlisten = [\"unix:/run/x.sock\"]\n[service.handler]\nplugin = \"echo\"\n",
        );
        assert!(
            e.starts_with("t.toml:5:11: duplicate listen address unix:/run/x.sock: already used by [control] socket"),
            "{e}"
        );
        let long = format!(
            "[control]\nsocket = \"/{}\"\n[[service]]\nname = \"a\"\nlisten = [\"unix:/run/x.sock\"]\n[service.handler]\nplugin = \"echo\"\n",
            "x".repeat(200)
        );
        assert!(
            err(&long).starts_with("t.toml:2:10: control socket: "),
            "{}",
            err(&long)
        );
    }

    #[test]
    fn zero_workers() {
        let e = err(
            "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\nworkers = 0\n[service.handler]\nplugin = \"echo\"\n",
        );
        assert!(e.starts_with("t.toml:4:11: workers = 0"), "{e}");
    }

    #[test]
    fn empty_listen() {
        let e =
            err("[[service]]\nname = \"a\"\nlisten = []\n[service.handler]\nplugin = \"echo\"\n");
        assert!(
            e.starts_with("t.toml:3:10: service \"a\": listen is empty"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_names_and_addresses() {
        let two = |n2: &str, a2: &str| {
            format!(
                "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:7\"]\n[service.handler]\nplugin = \"echo\"\n\
                 [[service]]\nname = \"{n2}\"\nlisten = [\"{a2}\"]\n[service.handler]\nplugin = \"echo\"\n"
            )
        };
        let e = err(&two("a", "tcp://127.0.0.1:8"));
        assert!(
            e.starts_with("t.toml:7:8: duplicate service name \"a\""),
            "{e}"
        );
        let e = err(&two("b", "tcp://127.0.0.1:7"));
        assert!(
            e.starts_with("t.toml:8:11: duplicate listen address tcp://127.0.0.1:7"),
            "{e}"
        );
        // Port 0 twice is two different kernel-chosen ports.
        parse(&two("b", "tcp://127.0.0.1:0").replace(":7\"", ":0\"")).unwrap();
    }

    #[test]
    fn bad_addresses_and_durations() {
        let e = err(
            "[[service]]\nname = \"a\"\nlisten = [\"tcp://localhost:1\"]\n[service.handler]\nplugin = \"echo\"\n",
        );
        assert!(e.starts_with("t.toml:3:11: invalid listen address"), "{e}");
        let e = err(
            "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\ngraceful_timeout = \"soon\"\n[service.handler]\nplugin = \"echo\"\n",
        );
        assert!(
            e.starts_with("t.toml:4:20: invalid duration \"soon\""),
            "{e}"
        );
        let long = format!("unix:/{}", "x".repeat(120));
        let e = err(&format!(
            "[[service]]\nname = \"a\"\nlisten = [\"{long}\"]\n[service.handler]\nplugin = \"echo\"\n"
        ));
        assert!(e.contains("at most 107 bytes"), "{e}");
    }

    #[test]
    fn proxy_protocol_needs_its_balancers_and_a_stream_listener() {
        let svc = |listen: &str, extra: &str| {
            format!(
                "[[service]]\nname = \"a\"\nlisten = [{listen}]\n{extra}\n[service.handler]\nplugin = \"echo\"\n"
            )
        };
        let tcp = "\"tcp://127.0.0.1:1\"";
        let c = parse(&svc(
            tcp,
            "proxy_protocol = \"v2\"\nproxy_from = [\"10.0.0.0/24\", \"192.0.2.1\"]",
        ))
        .unwrap();
        let p = c.services[0].proxy.as_ref().unwrap();
        assert_eq!(p.version, proxy::Version::V2);
        assert_eq!(p.from.len(), 2);
        assert!(parse(&svc(tcp, "")).unwrap().services[0].proxy.is_none());
        // A Unix listener alone: its peers are trusted.
        let c = parse(&svc("\"unix:/tmp/a.sock\"", "proxy_protocol = \"any\"")).unwrap();
        assert!(c.services[0].proxy.as_ref().unwrap().from.is_empty());

        let e = err(&svc(tcp, "proxy_protocol = \"v2\""));
        assert!(
            e.starts_with("t.toml:4:18: service \"a\": proxy_protocol needs proxy_from"),
            "{e}"
        );
        let e = err(&svc(tcp, "proxy_from = [\"10.0.0.1\"]"));
        assert!(
            e.starts_with("t.toml:4:15: service \"a\": proxy_from without proxy_protocol"),
            "{e}"
        );
        let e = err(&svc(
            tcp,
            "proxy_protocol = \"v1\"\nproxy_from = [\"10.0.0.300\"]",
        ));
        assert!(
            e.starts_with("t.toml:5:15: service \"a\": proxy_from: invalid address \"10.0.0.300\""),
            "{e}"
        );
        let e = err(&svc(
            tcp,
            "proxy_protocol = \"v1\"\nproxy_from = [\"uid:0\"]",
        ));
        assert!(e.contains("\"uid:0\" is not an IP address or range"), "{e}");
        let e = err(&svc(
            "\"tcp://127.0.0.1:1\", \"udp://127.0.0.1:1\"",
            "proxy_protocol = \"v2\"\nproxy_from = [\"10.0.0.1\"]",
        ));
        assert!(
            e.contains(
                "proxy_protocol is for stream listeners, and udp://127.0.0.1:1 is a datagram socket"
            ),
            "{e}"
        );
        let e = err(&svc(tcp, "proxy_protocol = \"v3\""));
        assert!(e.starts_with("t.toml:4:18:"), "{e}");
    }

    #[test]
    fn access_lists_timeouts_and_per_ip_limit() {
        let svc = |extra: &str| {
            format!(
                "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\n{extra}\n[service.handler]\nplugin = \"echo\"\n"
            )
        };
        let c = parse(&svc(
            "allow = [\"127.0.0.0/8\", \"::1\", \"uid:0\"]\ndeny = [\"127.0.0.2\"]\nmax_connections_per_ip = 3\ntimeout = \"10s\"\nread_timeout = \"5s\"",
        ))
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.acl.allow.len(), 3);
        assert_eq!(s.acl.deny.len(), 1);
        assert_eq!(s.max_connections_per_ip, 3);
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(
            s.idle_timeout,
            Duration::from_secs(5),
            "read_timeout is an alias"
        );
        let d = parse(&svc("")).unwrap();
        let s = &d.services[0];
        assert!(s.acl.is_empty());
        assert_eq!(
            (s.timeout, s.idle_timeout),
            (Duration::ZERO, Duration::ZERO)
        );
        let e = err(&svc("deny = [\"10.0.0.0/8\", \"10.0.0.300\"]"));
        assert!(
            e.starts_with("t.toml:4:23: service \"a\": deny: invalid address \"10.0.0.300\": expected an IP address"),
            "{e}"
        );
        let e = err(&svc("allow = [\"10.1.0.0/8\"]"));
        assert!(
            e.starts_with(
                "t.toml:4:10: service \"a\": allow: \"10.1.0.0/8\" has bits set past its /8 prefix"
            ),
            "{e}"
        );
        let e = err(&svc("allow = \"127.0.0.1\""));
        assert!(e.starts_with("t.toml:4:9: invalid type"), "{e}");
        let e = err(&svc("idle_timeout = \"1s\"\nread_timeout = \"2s\""));
        assert!(e.contains("duplicate field"), "{e}");
    }

    #[test]
    fn durations_are_bounded() {
        let with = |k: &str, v: &str| {
            parse(&format!(
                "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\n{k} = \"{v}\"\n[service.handler]\nplugin = \"echo\"\n"
            ))
        };
        let e = with("graceful_timeout", "300000000000y").unwrap_err();
        assert!(e.starts_with("t.toml:4:20: duration"), "{e}");
        assert!(e.contains("at most \"24h\""), "{e}");
        let e = with("ready_timeout", "0s").unwrap_err();
        assert!(e.starts_with("t.toml:4:17: a zero timeout"), "{e}");
        assert!(with("graceful_timeout", "0s").is_ok());
        assert!(with("ready_timeout", "24h").is_ok());
    }

    #[test]
    fn syntax_error_is_one_line() {
        let e = err("[[service]\nname = \"a\"\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn no_service() {
        let e = err("[log]\nlevel = \"info\"\n");
        assert!(e.contains("missing field `service`"), "{e}");
    }

    #[test]
    fn socket_mode_forms() {
        let with = |m: &str| {
            parse(&format!(
                "[[service]]\nname = \"a\"\nlisten = [\"unix:/tmp/a\"]\nsocket_mode = {m}\n[service.handler]\nplugin = \"echo\"\n"
            ))
        };
        assert_eq!(
            with("\"0600\"").unwrap().services[0].socket_mode,
            SocketMode(0o600)
        );
        assert_eq!(
            with("0o640").unwrap().services[0].socket_mode,
            SocketMode(0o640)
        );
        assert!(with("\"999\"").is_err());
    }

    fn with_log(log: &str) -> Result<Config, String> {
        parse(&format!("[log]\n{log}\n{GOOD}"))
    }

    #[test]
    fn log_targets_and_their_keys() {
        let c = with_log(
            "target = \"syslog\"\nsyslog = \"udp://[::1]:514\"\nsyslog_format = \"rfc5424\"\nfacility = \"local3\"",
        )
        .unwrap();
        assert_eq!(c.log.target(), LogTarget::Syslog);
        assert_eq!(c.log.syslog, SyslogAddr::Udp("[::1]:514".into()));
        assert_eq!(c.log.syslog_format, SyslogFormat::Rfc5424);
        assert_eq!(c.log.facility.code(), 19);
        let again = parse(&c.to_toml()).unwrap();
        assert!(again.log.same_target(&c.log));
        let c = with_log("target = \"syslog\"\nsyslog = \"tcp://logs.example:6514\"").unwrap();
        assert_eq!(c.log.syslog, SyslogAddr::Tcp("logs.example:6514".into()));
        let c = with_log("target = \"file\"\nfile = \"/var/log/p.log\"").unwrap();
        assert_eq!(c.log.file_path(), Some(Path::new("/var/log/p.log")));
        assert!(!c.log.same_target(&LogConfig::default()));
    }

    #[test]
    fn log_errors_are_located() {
        let e = with_log("target = \"journal\"").unwrap_err();
        assert!(
            e.starts_with("t.toml:2:10: unknown variant `journal`"),
            "{e}"
        );
        let e = with_log("target = \"file\"").unwrap_err();
        assert!(
            e.starts_with("t.toml:2:10: target = \"file\" needs the file's path"),
            "{e}"
        );
        let e = with_log("facility = \"local8\"").unwrap_err();
        assert!(
            e.starts_with(
                "t.toml:2:12: unknown syslog facility \"local8\": expected one of kern, user,"
            ),
            "{e}"
        );
        let e = with_log("syslog = \"/dev/log\"").unwrap_err();
        assert!(e.starts_with("t.toml:2:10: invalid syslog address"), "{e}");
        let e = with_log("syslog = \"udp://10.0.0.1\"").unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
        let e = with_log("syslog_format = \"rfc9999\"").unwrap_err();
        assert!(
            e.starts_with("t.toml:2:17: unknown variant `rfc9999`"),
            "{e}"
        );
        let e = with_log("colour = true").unwrap_err();
        assert!(e.starts_with("t.toml:2:1: unknown field `colour`"), "{e}");
    }

    fn with_pool(extra: &str) -> Result<Config, String> {
        parse(&format!(
            "[[service]]\nname = \"a\"\nlisten = [\"tcp://127.0.0.1:1\"]\n{extra}\n[service.handler]\nplugin = \"echo\"\n"
        ))
    }

    #[test]
    fn pools_and_their_bounds() {
        let c = with_pool(
            "pool = \"dynamic\"\nmin_spare = 2\nmax_spare = 4\nmax_workers = 8\nworkers = 3",
        )
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.pool_kind(), PoolKind::Dynamic);
        assert_eq!(s.pool_bounds(), (2, 4, 8));
        assert_eq!(s.start_workers(), 3);
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.services[0].pool_bounds(), (2, 4, 8));
        let c = with_pool("pool = \"ondemand\"\nmax_workers = 5\nidle_worker_timeout = \"3s\"")
            .unwrap();
        assert_eq!(c.services[0].start_workers(), 0);
        assert_eq!(c.services[0].idle_worker_timeout, Duration::from_secs(3));
        let c = with_pool("workers = 2").unwrap();
        assert_eq!(c.services[0].pool_kind(), PoolKind::Static);
        assert_eq!(c.services[0].idle_worker_timeout, Duration::from_secs(10));

        let e = with_pool("pool = \"dynamic\"\nmax_workers = 8").unwrap_err();
        assert!(
            e.starts_with("t.toml:4:8: service \"a\": pool = \"dynamic\" needs min_spare, max_spare and max_workers"),
            "{e}"
        );
        let e = with_pool("pool = \"dynamic\"\nmin_spare = 5\nmax_spare = 4\nmax_workers = 8")
            .unwrap_err();
        assert!(
            e.starts_with("t.toml:5:13: service \"a\": min_spare = 5 is more than max_spare = 4"),
            "{e}"
        );
        let e = with_pool("pool = \"dynamic\"\nmin_spare = 1\nmax_spare = 9\nmax_workers = 8")
            .unwrap_err();
        assert!(
            e.starts_with("t.toml:6:13: service \"a\": max_spare = 9 is more than max_workers = 8"),
            "{e}"
        );
        let e = with_pool(
            "pool = \"dynamic\"\nmin_spare = 2\nmax_spare = 4\nmax_workers = 8\nworkers = 9",
        )
        .unwrap_err();
        assert!(e.contains("workers = 9 (the dynamic pool's start size) is outside min_spare..=max_workers (2..=8)"), "{e}");
        let e = with_pool("pool = \"ondemand\"\nmax_workers = 4\nworkers = 2").unwrap_err();
        assert!(
            e.contains("workers = 2 does not apply to pool = \"ondemand\""),
            "{e}"
        );
        let e = with_pool("pool = \"ondemand\"").unwrap_err();
        assert!(
            e.starts_with("t.toml:4:8: service \"a\": pool = \"ondemand\" needs max_workers"),
            "{e}"
        );
        let e = with_pool("pool = \"ondemand\"\nmax_workers = 4\nmin_spare = 1").unwrap_err();
        assert!(
            e.starts_with(
                "t.toml:6:13: service \"a\": min_spare does not apply to pool = \"ondemand\""
            ),
            "{e}"
        );
        let e = with_pool("max_workers = 4").unwrap_err();
        assert!(
            e.starts_with(
                "t.toml:4:15: service \"a\": max_workers does not apply to pool = \"static\""
            ),
            "{e}"
        );
        let e = with_pool("pool = \"ondemand\"\nmax_workers = 0").unwrap_err();
        assert!(
            e.contains("max_workers = 0: expected a number from 1 to 4096"),
            "{e}"
        );
        let e = with_pool("pool = \"elastic\"").unwrap_err();
        assert!(
            e.starts_with("t.toml:4:8: unknown variant `elastic`"),
            "{e}"
        );
    }

    #[test]
    fn sizes_and_recycling_limits() {
        for (text, bytes) in [
            ("256MiB", 256 << 20),
            ("512M", 512 << 20),
            ("1G", 1 << 30),
            ("1.5GiB", 3 << 29),
            ("64KiB", 64 << 10),
            ("800MB", 800_000_000),
            ("1000", 1000),
            ("7B", 7),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "M", "12 parsecs", "-1M", "1e400"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize(128 << 20).to_string(), "128MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        let c = with_pool("max_memory = \"128MiB\"\nmax_memory_jitter = 1048576\nmax_age = \"1h\"\nmax_age_jitter = \"5m\"").unwrap();
        let s = &c.services[0];
        assert_eq!(s.max_memory, ByteSize(128 << 20));
        assert_eq!(s.max_memory_jitter, ByteSize(1 << 20));
        assert_eq!(
            (s.max_age, s.max_age_jitter),
            (Duration::from_secs(3600), Duration::from_secs(300))
        );
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.services[0].max_memory, s.max_memory);
        let e = with_pool("max_memory = \"lots\"").unwrap_err();
        assert!(e.starts_with("t.toml:4:14: invalid size \"lots\""), "{e}");
    }

    #[test]
    fn metrics_address() {
        let c = parse(&format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{GOOD}")).unwrap();
        assert_eq!(c.metrics.addr, Some("127.0.0.1:0".parse().unwrap()));
        assert!(c.metrics.listen_key().unwrap().starts_with("metrics:"));
        let c = parse(&format!("[metrics]\nlisten = \"tcp://[::1]:9109\"\n{GOOD}")).unwrap();
        assert_eq!(c.metrics.addr, Some("[::1]:9109".parse().unwrap()));
        assert!(parse(GOOD).unwrap().metrics.addr.is_none());
        let e = err(&format!("[metrics]\nlisten = \"localhost:9\"\n{GOOD}"));
        assert!(
            e.starts_with("t.toml:2:10: invalid metrics address \"localhost:9\""),
            "{e}"
        );
        let e = err(&format!(
            "[metrics]\nlisten = \"127.0.0.1:7\"\n{}",
            GOOD.replace("127.0.0.1:0", "127.0.0.1:7")
        ));
        assert!(
            e.contains(
                "duplicate listen address tcp://127.0.0.1:7: already used by [metrics] listen"
            ),
            "{e}"
        );
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é=1", 2), (1, 2));
    }

    #[test]
    fn daemon_user_and_group_are_resolved_or_located() {
        let c = parse(&format!("[daemon]\nuser = \"root\"\n{GOOD}")).unwrap();
        let creds = c.daemon.credentials.unwrap();
        assert_eq!((creds.uid.as_raw(), creds.gid.as_raw()), (0, 0));
        assert!(creds.groups.contains(&creds.gid));
        assert!(parse(GOOD).unwrap().daemon.credentials.is_none());
        assert_eq!(
            err(&format!("[daemon]\nuser = \"no-such-user-x\"\n{GOOD}")),
            "t.toml:2:8: unknown user \"no-such-user-x\": expected a user of this system"
        );
        assert_eq!(
            err(&format!(
                "[daemon]\nuser = \"root\"\ngroup = \"no-such-group-x\"\n{GOOD}"
            )),
            "t.toml:3:9: unknown group \"no-such-group-x\": expected a group of this system"
        );
        assert_eq!(
            err(&format!("[daemon]\ngroup = \"root\"\n{GOOD}")),
            "t.toml:2:9: group needs a user: set [daemon] user as well"
        );
    }
}
