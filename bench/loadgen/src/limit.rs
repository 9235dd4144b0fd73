//! Descriptors: the soft RLIMIT_NOFILE raised to the hard limit at start
//! (as nginx's `worker_rlimit_nofile` and Go's runtime do), so that
//! `-c 10000` needs no `ulimit -n` by hand, and a run that cannot fit is
//! refused before it opens a socket.
//!
//! Owns: nothing past the call (the process's limit is the kernel's).

use crate::cli::{Config, Engine};
use std::io;

/// Descriptors besides the connections: stdio, epoll instances, the
/// allocator's and the runtime's few.
const SPARE: u64 = 64;

fn get() -> io::Result<libc::rlimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for the kernel to fill; the result is
    // checked.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Raise the soft limit to the hard one; the soft limit now in force.
pub fn raise() -> io::Result<u64> {
    let mut r = get()?;
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: a valid rlimit read from the kernel, only the soft value
        // changed (to the hard one, always allowed); the result is checked.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(r.rlim_cur)
}

/// Raise the limit and check that `cfg`'s connections fit under it.
pub fn fit(cfg: &Config) -> Result<(), String> {
    let have = raise().map_err(|e| format!("setrlimit(RLIMIT_NOFILE) failed: {e}"))?;
    let loops = if cfg.engine == Engine::Epoll {
        cfg.loops as u64
    } else {
        0
    };
    let need = cfg.connections as u64 + loops + SPARE;
    if need > have {
        return Err(format!(
            "-c {} needs about {need} descriptors, and RLIMIT_NOFILE allows {have} (the hard limit); \
             lower -c, or raise the hard limit (ulimit -Hn, LimitNOFILE=)",
            cfg.connections
        ));
    }
    Ok(())
}
