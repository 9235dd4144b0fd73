//! Logging through the `log` facade: one line per record on standard error,
//! `TIMESTAMP preforkd[PID]: LEVEL: message`, written with a single write(2)
//! so that lines from workers and threads never interleave.
//!
//! Every process logs with its own pid (the master and each worker).

use std::io::Write;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
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
