//! Logging through the `log` facade: one line per record on standard error,
//! `TIMESTAMP preforkd[PID]: LEVEL: message`, written with a single write(2)
//! so that lines from workers and threads never interleave.
//!
//! Every process logs with its own pid (the master and each worker).
//!
//! Reopening (SIGUSR1, for logrotate): the signal handler only calls
//! [`request_reopen`]; the next record written, in whatever thread, reopens
//! the target first. Standard error is inherited and has nothing to reopen;
//! file targets reopen their path there.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGUSR1 (async-signal-safe), consumed by the next write.
static REOPEN: AtomicBool = AtomicBool::new(false);

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if REOPEN.swap(false, Ordering::SeqCst) {
            reopen();
        }
        let line = format!(
            "{} preforkd[{}]: {}: {}\n",
            humantime::format_rfc3339_millis(std::time::SystemTime::now()),
            std::process::id(),
            record.level(),
            record.args()
        );
        // A log line that cannot be written (stderr closed, disk full) is
        // dropped: logging never stops or kills a worker.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger at `level` (idempotent: a second call only sets the level).
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Asks for the log target to be reopened before the next record.
/// Async-signal-safe: it only stores to an atomic.
pub fn request_reopen() {
    REOPEN.store(true, Ordering::SeqCst);
}

/// Reopens the log target now. Standard error is the only target so far;
/// it is inherited from whoever started preforkd (a terminal, journald's
/// stream, a file opened by the shell), so there is nothing to reopen.
pub fn reopen() {
    REOPEN.store(false, Ordering::SeqCst);
}
