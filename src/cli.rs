//! The command line: `preforkd [-c FILE] [run|check|print-config|status|
//! reload|upgrade|stop|scale]`.
//!
//! [`main`] is the whole binary; [`main_with`] is the same CLI with a
//! registry of your own plugins, for binaries that embed preforkd.
//! Errors are mapped to exit codes here and nowhere else: [`exit_status`]
//! (ripgrep's `main`; the contract is in the README's "Exit codes").

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::config::ConfigError;
use crate::control::{self, Request};
use crate::exit::code;
use crate::handler::Registry;
use crate::listener::ListenError;
use crate::log::LogError;
use crate::master::{Master, MasterError, Startup, counted};
use crate::resolve::{self, Resolved};
use crate::sys;
use crate::upgrade::{Exec, Inherited};

/// Why a command failed. Each becomes an exit status in [`exit_status`];
/// the message is what the user reads (one line).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (or cannot be read).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The master could not start, or its first generation failed.
    #[error(transparent)]
    Master(#[from] MasterError),
    /// The log target could not be set up.
    #[error(transparent)]
    Log(#[from] LogError),
    /// `--daemon` without a pid file to lock.
    #[error("--daemon needs [daemon] pid_file (to lock it, and to find the daemon)")]
    DaemonNeedsPidFile,
    /// Taking over the process's environment failed before the master
    /// could start (binary upgrade, socket activation, paths).
    #[error("{context}: {reason}")]
    Setup {
        /// What was being set up.
        context: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// The exit status of each error: every mapping from an error to a status
/// is here.
pub fn exit_status(e: &Error) -> i32 {
    match e {
        Error::Config(_) | Error::DaemonNeedsPidFile => code::CONFIG,
        Error::Master(MasterError::Listen(
            ListenError::NotPassed { .. } | ListenError::WrongKind { .. },
        )) => code::CONFIG,
        Error::Master(MasterError::Listen(_)) => code::UNAVAILABLE,
        Error::Master(MasterError::Boot { .. }) => code::CONFIG,
        Error::Master(MasterError::PidFile { .. }) | Error::Log(_) => code::CANTCREAT,
        Error::Master(MasterError::Sys { .. }) | Error::Setup { .. } => code::SOFTWARE,
    }
}

fn setup_err(context: &'static str) -> impl FnOnce(String) -> Error {
    move |reason| Error::Setup { context, reason }
}

/// `println!` that ends the process quietly (exit 0) once standard output
/// is closed (`preforkd plugins | head -1`), as ripgrep does.
macro_rules! outln {
    ($($arg:tt)*) => { emit(&format!("{}\n", format_args!($($arg)*))) };
}

/// `print!`, as `outln!`.
macro_rules! out {
    ($($arg:tt)*) => { emit(&format!($($arg)*)) };
}

/// Writes to standard output; a closed pipe ends the process with 0 (the
/// reader has what it wanted), any other failure with 1.
fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(code::OK);
        }
        eprintln!("preforkd: cannot write to standard output: {e}");
        std::process::exit(code::FAILED);
    }
}

/// preforkd: a pre-fork daemon for any socket service.
#[derive(Debug, Parser)]
#[command(name = "preforkd", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML). Without it, the embedded default: echo on
    /// tcp://127.0.0.1:8009 with 2 workers.
    #[arg(short, long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// Run as a daemon: detach, with the pid file (`[daemon] pid_file`,
    /// required) locked. The command exits 0 once the sockets are bound and
    /// the first generation is ready, or with the failure's code and reason.
    #[arg(long, global = true)]
    pub daemon: bool,

    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run in the foreground (the default).
    Run,
    /// Validate the config and print a summary (exit 0, or 78 if invalid).
    Check,
    /// Print the effective config, defaults filled in.
    PrintConfig,
    /// List the handler plugins this binary has, built in and registered.
    Plugins,
    /// Show the running master's state (needs `[control] socket`).
    Status {
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reload the config; waits until it has succeeded (exit 0) or failed (1).
    Reload(Wait),
    /// Binary upgrade: start the binary on disk as the new master; waits
    /// until it has taken over (exit 0) or failed (1).
    Upgrade(Wait),
    /// Graceful stop; waits until the master has exited.
    Stop(Wait),
    /// Set a service's number of workers until the next reload.
    Scale {
        /// The service.
        service: String,
        /// Its number of workers (1 to 4096).
        #[arg(value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::config::MAX_WORKERS)))]
        workers: u32,
    },
}

/// How long a control command waits for the outcome.
#[derive(Debug, Clone, clap::Args)]
pub struct Wait {
    /// Give up waiting after this long (the operation goes on).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs the `preforkd` binary with the built-in plugins; never returns.
pub fn main() -> ! {
    main_with(Registry::builtin())
}

/// Runs the `preforkd` CLI with `registry`'s plugins; never returns.
pub fn main_with(registry: Registry) -> ! {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                code::USAGE
            } else {
                code::OK
            });
        }
    };
    std::process::exit(run(cli, &registry))
}

fn load(cli: &Cli, registry: &Registry) -> Result<Resolved, ConfigError> {
    resolve::load(cli.config.as_deref(), registry)
}

/// Executes a parsed command line; returns the exit code.
pub fn run(cli: Cli, registry: &Registry) -> i32 {
    crate::log::init(log::LevelFilter::Info);
    if cli.daemon && !matches!(cli.command.as_ref().unwrap_or(&Command::Run), Command::Run) {
        eprintln!("preforkd: --daemon applies to run only");
        return code::USAGE;
    }
    match cli.command.as_ref().unwrap_or(&Command::Run) {
        Command::Check => {
            let checked = load(&cli, registry).and_then(|r| {
                resolve::check_paths(&r)?;
                resolve::check_plugins(&r)?;
                Ok(r.config)
            });
            match checked {
                Ok(config) => {
                    outln!("{}: configuration is valid", config.source);
                    for s in &config.services {
                        let listen: Vec<String> = s.addrs.iter().map(ToString::to_string).collect();
                        let (min, max, top) = s.pool_bounds();
                        let workers = match s.pool_kind() {
                            crate::config::PoolKind::Static => {
                                counted(s.workers.resolve() as usize, "worker")
                            }
                            crate::config::PoolKind::Dynamic => format!(
                                "dynamic pool of {} to {top} workers ({min} to {max} idle)",
                                s.start_workers()
                            ),
                            crate::config::PoolKind::Ondemand => {
                                format!("ondemand pool of 0 to {top} workers")
                            }
                        };
                        outln!(
                            "  service {}: plugin {}, {workers} x {}, listen {}",
                            s.name.get_ref(),
                            s.handler.plugin.get_ref(),
                            counted(s.threads as usize, "thread"),
                            listen.join(", ")
                        );
                    }
                    code::OK
                }
                Err(e) => config_error(e),
            }
        }
        Command::Plugins => {
            out!("{}", plugin_table(registry));
            code::OK
        }
        Command::PrintConfig => match load(&cli, registry) {
            Ok(resolved) => {
                out!("{}", resolved.config.to_toml());
                code::OK
            }
            Err(e) => config_error(e),
        },
        Command::Run => {
            let (status, reason) = match serve(&cli, registry) {
                Ok(status) => (status, format!("the master exited with code {status}")),
                Err(e) => {
                    match &e {
                        // Before anything is set up: for the terminal.
                        Error::Config(_) => eprintln!("preforkd: {e}"),
                        _ => log::error!("{e}"),
                    }
                    (exit_status(&e), e.to_string())
                }
            };
            if crate::daemon::is_daemon() {
                // Before it was ready: the launcher is still waiting.
                crate::daemon::failed(status, &reason);
            }
            status
        }
        Command::Status { json } => {
            let json = *json;
            with_control(
                &cli,
                registry,
                Request::Status,
                Duration::from_secs(10),
                |v| {
                    if json {
                        outln!("{v}");
                    } else {
                        out!("{}", status_table(v));
                    }
                },
            )
        }
        Command::Reload(w) => request(&cli, registry, Request::Reload, w, libc::SIGHUP),
        Command::Upgrade(w) => request(&cli, registry, Request::Upgrade, w, libc::SIGUSR2),
        Command::Stop(w) => request(&cli, registry, Request::Stop, w, libc::SIGTERM),
        Command::Scale { service, workers } => with_control(
            &cli,
            registry,
            Request::Scale {
                service: service.clone(),
                workers: *workers,
            },
            Duration::from_secs(10),
            |v| {
                outln!(
                    "service {service}: {} (was {})",
                    counted(v["workers"].as_u64().unwrap_or(0) as usize, "worker"),
                    v["was"]
                )
            },
        ),
    }
}

/// `run`: the master, in the foreground; its exit code after a stop.
fn serve(cli: &Cli, registry: &Registry) -> Result<i32, Error> {
    // A binary upgrade's new master: take what the old one handed over
    // before anything else can see it.
    let mut inherited = Inherited::from_env().map_err(setup_err("binary upgrade"))?;
    // Socket activation: the sockets systemd passed (not in a new master
    // of an upgrade, whose sockets come from the old master); the
    // variables are removed in any case, before anything forks.
    let activated = crate::systemd::take_listen_fds(inherited.is_none())
        .map_err(setup_err("socket activation"))?;
    // Read and removed before anything forks, so that no worker inherits
    // it; the master keeps the value.
    let notifier = crate::systemd::Notifier::from_env()
        .map_err(|e| setup_err("cannot clear the systemd environment")(e.to_string()))?;
    // Before anything forks, so that every worker can hold its
    // connections (logged once the log is set up).
    let raised = sys::raise_nofile();
    let mut resolved = load(cli, registry).inspect_err(|e| {
        if let Some(i) = &mut inherited {
            i.report_error(&e.to_string());
        }
    })?;
    // What the next master runs: this binary, by the path it was started
    // from, with the config made absolute (before --daemon changes to /).
    // The master names it so from the start, as a reload reads it.
    let config_path = cli
        .config
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(|e| setup_err("cannot resolve the config path")(e.to_string()))?;
    if let Some(path) = &config_path {
        resolved.config.source = crate::config::Source::File(path.clone());
    }
    let config = &resolved.config;
    if cli.daemon {
        let pid_file = config
            .daemon
            .pid_file
            .as_deref()
            .ok_or(Error::DaemonNeedsPidFile)?;
        let pid_file = std::path::absolute(pid_file)
            .map_err(|e| setup_err("cannot resolve the pid file's path")(e.to_string()))?;
        match crate::daemon::daemonize(&pid_file) {
            crate::daemon::Side::Launcher(status) => return Ok(status),
            crate::daemon::Side::Daemon => {}
        }
    }
    crate::log::configure(&config.log).inspect_err(|e| {
        if let Some(i) = &mut inherited {
            i.report_error(&e.to_string());
        }
    })?;
    if cli.config.is_none() {
        log::info!(
            "no --config given: serving the embedded default (echo on tcp://127.0.0.1:8009, 2 workers)"
        );
    } else {
        log::info!("configuration {}", config.source);
    }
    match raised {
        Ok(Some((from, to))) => log::info!(
            "raised the open files limit from {from} to {to} (the hard limit; programs started by exec get {from} back)"
        ),
        Ok(None) => {}
        Err(e) => log::warn!(
            "setrlimit(RLIMIT_NOFILE) failed: {e}; workers keep the current open files limit"
        ),
    }
    if let Err(e) = sys::init_title() {
        log::debug!("process titles unavailable: {e}");
    }
    let mut args = Vec::new();
    if let Some(p) = &config_path {
        args.push("--config".into());
        args.push(p.clone().into_os_string());
    }
    args.push("run".into());
    let exec = match Exec::current(args) {
        Ok(e) => Some(e),
        Err(e) => {
            log::warn!("binary upgrades are unavailable: cannot find this program's path: {e}");
            None
        }
    };
    let startup = Startup {
        config_path,
        exec,
        inherited,
        notifier,
        activated,
    };
    let status = Master::new(resolved, registry.clone(), startup).and_then(Master::run)?;
    Ok(status)
}

/// Sends `request` over the control socket and hands the successful
/// answer to `show`; a failed one is printed, exit 1.
fn with_control(
    cli: &Cli,
    registry: &Registry,
    request: Request,
    timeout: Duration,
    show: impl FnOnce(&Value),
) -> i32 {
    let ends = match endpoints(cli, registry) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let Some(path) = &ends.control else {
        eprintln!(
            "preforkd: {}: no [control] socket configured; {} needs one",
            ends.source,
            request.to_line()
        );
        return code::FAILED;
    };
    call(path, &request, timeout, show)
}

fn call(path: &Path, request: &Request, timeout: Duration, show: impl FnOnce(&Value)) -> i32 {
    match control::call(path, request, timeout) {
        Ok(v) if v["ok"] == Value::Bool(true) => {
            show(&v);
            code::OK
        }
        Ok(v) => {
            let reason = v["error"].as_str().unwrap_or("failed without a reason");
            eprintln!("preforkd: {}: {reason}", request.to_line());
            code::FAILED
        }
        Err(e) => {
            eprintln!("preforkd: {}: {e}", request.to_line());
            code::FAILED
        }
    }
}

/// `reload`, `upgrade`, `stop`: over the control socket, waiting for the
/// outcome; without one, a signal to the pid in the pid file.
fn request(cli: &Cli, registry: &Registry, request: Request, wait: &Wait, signal: i32) -> i32 {
    let ends = match endpoints(cli, registry) {
        Ok(e) => e,
        Err(e) => return e,
    };
    if let Some(path) = &ends.control {
        return call(path, &request, wait.timeout, |v| match &request {
            Request::Reload => outln!(
                "reloaded: generation {} serving (took {:.1} ms)",
                v["generation"],
                v["elapsed_ms"].as_f64().unwrap_or(0.0)
            ),
            Request::Upgrade => outln!(
                "upgraded: master pid {} took over from pid {}",
                v["new_pid"],
                v["old_pid"]
            ),
            _ => outln!("stopped: master pid {} has exited", v["pid"]),
        });
    }
    let Some(pid_file) = &ends.pid_file else {
        eprintln!(
            "preforkd: {}: neither [control] socket nor [daemon] pid_file is configured: cannot find the master",
            ends.source
        );
        return code::FAILED;
    };
    let pid = match std::fs::read_to_string(pid_file)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            s.trim()
                .parse::<i32>()
                .map_err(|_| format!("no pid in {s:?}"))
        }) {
        Ok(p) if p > 1 => p,
        Ok(p) => {
            eprintln!("preforkd: {}: bad pid {p}", pid_file.display());
            return code::FAILED;
        }
        Err(e) => {
            eprintln!("preforkd: {}: {e}", pid_file.display());
            return code::FAILED;
        }
    };
    let sig = nix::sys::signal::Signal::try_from(signal).expect("a valid signal");
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) => {
            outln!(
                "sent {} to master pid {pid}; without a [control] socket the outcome cannot be reported: see the log",
                sig.as_str()
            );
            code::OK
        }
        Err(e) => {
            eprintln!(
                "preforkd: cannot signal master pid {pid} (from {}): {e}",
                pid_file.display()
            );
            code::FAILED
        }
    }
}

/// Where to reach a running master, from its config file.
struct Endpoints {
    source: String,
    control: Option<PathBuf>,
    pid_file: Option<PathBuf>,
}

/// Reads the control socket and pid file paths from the config. A config
/// with errors still names them (a reload must reach the master, which
/// then reports those errors): when full validation fails, the two keys
/// are read from the TOML table, or, when even the TOML syntax is broken,
/// from `key = "value"` lines under `[control]` and `[daemon]`.
fn endpoints(cli: &Cli, registry: &Registry) -> Result<Endpoints, i32> {
    match load(cli, registry) {
        Ok(Resolved { config: c, .. }) => Ok(Endpoints {
            source: c.source.to_string(),
            control: c.control.path().map(Path::to_owned),
            pid_file: c.daemon.pid_file.clone(),
        }),
        Err(e) => {
            let path = match (&e, &cli.config) {
                (ConfigError::Invalid { .. }, Some(p)) => p,
                _ => return Err(config_error(e)),
            };
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let (control, pid_file) = lenient_endpoints(&text);
            if control.is_none() && pid_file.is_none() {
                return Err(config_error(e));
            }
            Ok(Endpoints {
                source: path.display().to_string(),
                control,
                pid_file,
            })
        }
    }
}

/// `[control] socket` and `[daemon] pid_file` from a config that does not
/// validate.
fn lenient_endpoints(text: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    if let Ok(t) = text.parse::<toml::Table>() {
        let get = |table: &str, key: &str| {
            t.get(table)
                .and_then(|v| v.get(key))
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
        };
        return (get("control", "socket"), get("daemon", "pid_file"));
    }
    let (mut control, mut pid_file, mut section) = (None, None, String::new());
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']', ' ']).to_string();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches(['"', '\'']).to_string();
        match (section.as_str(), key.trim()) {
            ("control", "socket") => control = Some(PathBuf::from(value)),
            ("daemon", "pid_file") => pid_file = Some(PathBuf::from(value)),
            _ => {}
        }
    }
    (control, pid_file)
}

/// The status document as a table.
pub fn status_table(v: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let secs = v["uptime_ms"].as_u64().unwrap_or(0) / 1000;
    let _ = writeln!(
        out,
        "master pid {}, {}, up {}, generation {}, config {}",
        v["pid"],
        v["state"].as_str().unwrap_or("?"),
        humantime::format_duration(Duration::from_secs(secs)),
        v["generation"],
        v["config"].as_str().unwrap_or("?")
    );
    if let Some(m) = v["reload"]["last"]["message"].as_str() {
        let _ = writeln!(out, "last reload: {m}");
    }
    for svc in v["services"].as_array().into_iter().flatten() {
        let listeners: Vec<&str> = svc["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "\nservice {} (plugin {}, {} workers): {}",
            svc["name"].as_str().unwrap_or("?"),
            svc["plugin"].as_str().unwrap_or("-"),
            svc["size"],
            listeners.join(", ")
        );
        if let Some(kind) = svc["pool"].as_str() {
            // An event-driven worker with room counts as able to take work
            // (src/master/policy.rs): said as such.
            let mut line = match svc["worker_connections"].as_u64() {
                Some(n) => format!(
                    "  pool {kind}, mode async: {} with room, {} full ({n} connections each)",
                    svc["idle"], svc["busy"]
                ),
                None => format!("  pool {kind}: {} idle, {} busy", svc["idle"], svc["busy"]),
            };
            if let Some(max) = svc["max_workers"].as_u64() {
                let _ = write!(
                    line,
                    "; max_workers {max}, reached {} times",
                    svc["pool_at_max"]
                );
            }
            if let Some(pid) = svc["recycling"].as_i64() {
                let _ = write!(line, "; recycling pid {pid}");
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "  {:<8} {:<12} {:>4} {:<9} {:>8} {:>6} {:>9} {:>9} {:>7} {:>6} {:>10}",
            "PID",
            "WORKER",
            "GEN",
            "STATE",
            "SERVED",
            "ACTIVE",
            "IN",
            "OUT",
            "REFUSED",
            "BEAT",
            "AGE"
        );
        for w in svc["workers"].as_array().into_iter().flatten() {
            let age = Duration::from_secs(w["age_ms"].as_u64().unwrap_or(0) / 1000);
            let beat = match w["heartbeat_age_ms"].as_u64() {
                Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
                None => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {:<8} {:<12} {:>4} {:<9} {:>8} {:>6} {:>9} {:>9} {:>7} {:>6} {:>10}",
                w["pid"].to_string(),
                w["name"].as_str().unwrap_or("?"),
                w["generation"].to_string(),
                w["state"].as_str().unwrap_or("?"),
                w["served"].to_string(),
                w["active"].to_string(),
                bytes(w["bytes_in"].as_u64()),
                bytes(w["bytes_out"].as_u64()),
                w["refused"].as_u64().map_or("-".into(), |n| n.to_string()),
                beat,
                humantime::format_duration(age).to_string()
            );
            for c in w["connections"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "    connection from {} for {:.1}s",
                    c["peer"].as_str().unwrap_or("?"),
                    c["age_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
                );
            }
        }
    }
    out
}

/// A byte count in the table: `512`, `3.2K`, `41.0M`, `7.5G`; `-` unknown.
fn bytes(n: Option<u64>) -> String {
    let Some(n) = n else { return "-".into() };
    match n {
        0..1024 => n.to_string(),
        _ => {
            let mut v = n as f64 / 1024.0;
            for unit in ["K", "M", "G", "T"] {
                if v < 1024.0 || unit == "T" {
                    return format!("{v:.1}{unit}");
                }
                v /= 1024.0;
            }
            unreachable!("the loop returns at T")
        }
    }
}

/// `preforkd plugins`: one line per plugin, name, socket kinds, the worker
/// modes it serves, description.
fn plugin_table(registry: &Registry) -> String {
    let width = registry.names().iter().map(|n| n.len()).max().unwrap_or(0);
    let widest = |f: fn(&crate::handler::PluginInfo) -> &'static str| {
        registry.plugins().map(|p| f(p).len()).max().unwrap_or(0)
    };
    let (kinds, modes) = (
        widest(|p| p.kinds()),
        widest(|p| p.mode_names()) + "mode ".len(),
    );
    registry
        .plugins()
        .map(|p| {
            format!(
                "{:width$}  {:kinds$}  {:modes$}  {}\n",
                p.name,
                p.kinds(),
                format!("mode {}", p.mode_names()),
                p.description
            )
        })
        .collect()
}

/// Prints a config error for `check`, `print-config` and the control
/// commands; its exit status.
fn config_error(e: ConfigError) -> i32 {
    let e = Error::Config(e);
    eprintln!("preforkd: {e}");
    exit_status(&e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_exit_status() {
        let io = || std::io::Error::other("x");
        let boot = MasterError::Boot {
            service: "a".into(),
            reason: "r".into(),
        };
        let pid_file = MasterError::PidFile {
            path: "/x".into(),
            source: io(),
        };
        let sys = MasterError::Sys {
            syscall: "poll",
            source: io(),
        };
        let log = LogError::File {
            path: "/x".into(),
            source: io(),
        };
        let setup = Error::Setup {
            context: "binary upgrade",
            reason: "bad".into(),
        };
        let config = ConfigError::Read {
            path: "/x".into(),
            source: io(),
        };
        assert_eq!(exit_status(&Error::DaemonNeedsPidFile), code::CONFIG);
        assert_eq!(exit_status(&Error::Config(config)), code::CONFIG);
        assert_eq!(exit_status(&Error::Master(boot)), code::CONFIG);
        assert_eq!(exit_status(&Error::Master(pid_file)), code::CANTCREAT);
        assert_eq!(exit_status(&Error::Log(log)), code::CANTCREAT);
        assert_eq!(exit_status(&Error::Master(sys)), code::SOFTWARE);
        assert_eq!(exit_status(&setup), code::SOFTWARE);
        assert_eq!(setup.to_string(), "binary upgrade: bad");
    }

    #[test]
    fn endpoints_survive_a_broken_config() {
        let valid_toml = "[control]\nsocket = \"/run/p.sock\"\n[daemon]\npid_file = \"/run/p.pid\"\n[[service]]\nname = 3\n";
        assert_eq!(
            lenient_endpoints(valid_toml),
            (Some("/run/p.sock".into()), Some("/run/p.pid".into()))
        );
        let broken = "[daemon]\npid_file = '/run/p.pid'\n[control]\nsocket = \"/run/p.sock\"\n[[service]]\nworkers = x\n";
        assert_eq!(
            lenient_endpoints(broken),
            (Some("/run/p.sock".into()), Some("/run/p.pid".into()))
        );
        assert_eq!(lenient_endpoints("workers = x"), (None, None));
    }
}
