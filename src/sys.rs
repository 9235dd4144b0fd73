//! The operating-system operations that need `unsafe`, each behind a safe
//! function (or, for one, an `unsafe fn` with its contract): fork, raw
//! signal dispositions, the worker's shutdown flag, closing inherited
//! descriptors, the process title, shared memory, privileges, and spawning
//! a program with raw system calls.
//!
//! A leaf: it imports nothing from the rest of preforkd. What to do is
//! decided elsewhere and passed in as data (which signals a worker handles
//! and how, in [`crate::signals`]; the credentials to drop to; the signals
//! a program gets back at their default).
//!
//! Every `unsafe` block of preforkd is here, each with a `SAFETY:` note,
//! except in two places where the promise can only be made by the caller:
//!
//! - `src/signals.rs`: one block, installing the worker's signal handlers
//!   through [`set_disposition`], vouching that the handlers it defines
//!   there are async-signal-safe (they reach the log module's reopen flag,
//!   which sys must not import);
//! - `src/handler/dylib.rs`: calls into a plugin's shared library through
//!   its C ABI, which no wrapper here could make safe.
//!
//! Owns: the worker's shutdown flag and its wake pipe (process globals,
//! because a signal handler must reach them), and the memory region of the
//! process title.

use std::ffi::CString;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigAction, SigHandler, SigSet, SigmaskHow, Signal, sigaction};
use nix::unistd::{ForkResult, Pid};

/// Which side of a fork we are on.
pub enum Forked {
    /// In the parent; the child's pid.
    Parent(Pid),
    /// In the new child process.
    Child,
}

/// Forks the calling process.
///
/// Only the master calls this, and the master is single-threaded (checked by
/// [`assert_single_threaded`] at start), so the child is a consistent copy:
/// no lock can be held by a thread that does not exist in the child.
///
/// Every signal is blocked across the fork, and stays blocked in the child,
/// so that a signal meant for the new worker (SIGTERM right after it was
/// spawned) waits until the worker has installed its own handlers (and
/// called [`unblock_signals`]), instead of running the master's handler in
/// the child and being lost.
pub fn fork() -> io::Result<Forked> {
    let mut old = SigSet::empty();
    nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    // SAFETY: the master has exactly one thread (rule 1, checked at start), so
    // the child may run arbitrary code, allocate and take locks after fork.
    let forked = unsafe { nix::unistd::fork() };
    if let Ok(ForkResult::Child) = forked {
        return Ok(Forked::Child); // signals stay blocked until the worker's handlers are in place
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
    match forked? {
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        ForkResult::Child => unreachable!("handled above"),
    }
}

/// Fails unless the calling process has exactly one thread: fork() in a
/// threaded process copies one thread and whatever locks the others held.
pub fn assert_single_threaded() -> io::Result<()> {
    let n = std::fs::read_dir("/proc/self/task")?.count();
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the master must be single-threaded before it forks, but it has {n} threads"
        )))
    }
}

/// In the master: counts every delivery of `sig` in `counter` (through
/// signal-hook's registry, which chains the actions of one signal).
pub fn count_signal(sig: libc::c_int, counter: &'static AtomicUsize) -> io::Result<()> {
    // SAFETY: the action only increments an atomic, which is async-signal-safe.
    unsafe {
        signal_hook::low_level::register(sig, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })
    }?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Worker signals and the shutdown flag.

/// Set by SIGTERM (and by the worker itself after `max_requests`).
static SHUTDOWN: AtomicBool = AtomicBool::new(false);
/// Write end of the worker's wake pipe; -1 until [`init_shutdown_pipe`].
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// Read end of the wake pipe: readable forever once shutdown is requested,
/// so every thread polling it sees the request. Never drained.
static WAKE_READ: AtomicI32 = AtomicI32::new(-1);

/// Ends the process at once, from any thread, without unwinding, running
/// destructors or flushing: for a worker that must not linger.
/// Async-signal-safe (_exit(2)): a worker's fast-stop handler calls it.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Asks the worker to stop at its next request boundary. Async-signal-safe:
/// one atomic store and one write(2) to a nonblocking pipe.
pub fn request_shutdown() {
    SHUTDOWN.store(true, Ordering::SeqCst);
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: `fd` is the wake pipe's write end, created in
        // init_shutdown_pipe and never closed while the worker runs. A
        // full pipe (EAGAIN) is fine: it is already readable.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// True once the worker has been asked to stop.
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::SeqCst)
}

/// The wake pipe's read end: readable once shutdown is requested.
pub fn shutdown_fd() -> BorrowedFd<'static> {
    let fd = WAKE_READ.load(Ordering::SeqCst);
    assert!(fd >= 0, "shutdown_fd() before init_shutdown_pipe()");
    // SAFETY: the wake pipe is created once per worker process and never
    // closed until the process exits, so the fd outlives every borrow.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// In a freshly forked worker, before its signal handlers: creates the
/// wake pipe that [`request_shutdown`] writes and [`shutdown_fd`] returns.
pub fn init_shutdown_pipe() -> io::Result<()> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    WAKE_READ.store(into_raw(r), Ordering::SeqCst);
    WAKE_WRITE.store(into_raw(w), Ordering::SeqCst);
    Ok(())
}

/// What a process does when a signal arrives (a raw sigaction, no
/// signal-hook registry: in a worker it replaces the master's handlers,
/// whose self-pipe the worker does not have).
#[derive(Debug, Clone, Copy)]
pub enum Disposition {
    /// Run this function, in whatever thread the signal interrupts.
    Handle(extern "C" fn(libc::c_int)),
    /// SIG_IGN.
    Ignore,
    /// SIG_DFL.
    Default,
}

/// Sets what this process does on `sig`, with no flags and an empty mask.
///
/// # Safety
///
/// With [`Disposition::Handle`], the function must be async-signal-safe
/// (signal-safety(7)): it may interrupt any instruction of any thread,
/// including one inside malloc or holding a lock, so it may only touch
/// atomics and make async-signal-safe calls. `Ignore` and `Default` are
/// always sound.
pub unsafe fn set_disposition(sig: Signal, action: Disposition) -> io::Result<()> {
    let handler = match action {
        Disposition::Handle(f) => SigHandler::Handler(f),
        Disposition::Ignore => SigHandler::SigIgn,
        Disposition::Default => SigHandler::SigDfl,
    };
    let action = SigAction::new(handler, nix::sys::signal::SaFlags::empty(), SigSet::empty());
    // SAFETY: a handler is async-signal-safe by this function's contract;
    // SIG_DFL and SIG_IGN are always sound.
    unsafe { sigaction(sig, &action) }
        .map(drop)
        .map_err(io::Error::from)
}

/// Unblocks every signal in the calling thread: the end of a worker's
/// signal set-up, since [`fork`] left them all blocked.
pub fn unblock_signals() -> io::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    Ok(())
}

fn into_raw(fd: OwnedFd) -> RawFd {
    use std::os::fd::IntoRawFd;
    fd.into_raw_fd()
}

/// Asks the kernel to send SIGTERM to this process when its parent (the
/// master) dies, then checks that the parent is still `master`: it may have
/// died between fork and this call.
pub fn exit_with_parent(master: Pid) -> io::Result<bool> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(nix::unistd::getppid() == master)
}

/// Closes every descriptor from 3 up, except those in `keep` and the
/// worker's own wake pipe: a worker must not hold the master's self-pipe,
/// other workers' pipes or other services' sockets (a stopped service's
/// socket must really close).
pub fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let wake = [
        WAKE_READ.load(Ordering::SeqCst),
        WAKE_WRITE.load(Ordering::SeqCst),
    ];
    let mut keep: Vec<RawFd> = keep
        .iter()
        .chain(&wake)
        .copied()
        .filter(|fd| *fd >= 3)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first: RawFd = 3;
    for &k in keep.iter().chain(std::iter::once(&RawFd::MAX)) {
        if k > first {
            let last = if k == RawFd::MAX {
                u32::MAX
            } else {
                (k - 1) as u32
            };
            // SAFETY: the caller owns every descriptor of this freshly forked
            // process; those in the range are the master's and are never used
            // (nor closed again) by the worker, which exits without dropping
            // the master's state.
            if unsafe { libc::close_range(first as u32, last, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        first = k.saturating_add(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Process titles, as `ps` and /proc/PID/cmdline show them.

/// Start and length of the argv (+ environment) memory the title may use.
static TITLE_AREA: AtomicUsize = AtomicUsize::new(0);
static TITLE_LEN: AtomicUsize = AtomicUsize::new(0);

/// Prepares the process title: finds the argv strings' memory and moves the
/// environment strings that follow them to the heap, so that the whole area
/// can hold a title longer than the original command line. Call once, early,
/// while single-threaded, after the arguments have been parsed.
pub fn init_title() -> io::Result<()> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unexpected /proc/self/stat format"))?;
    // Fields 48..=51 (1-based) of /proc/PID/stat: arg_start arg_end env_start
    // env_end; field 3 is the first one after the command name.
    let fields: Vec<usize> = after_comm
        .split_whitespace()
        .skip(45)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let [arg_start, arg_end, env_start, env_end] = fields[..] else {
        return Err(io::Error::other("/proc/self/stat has no argv fields"));
    };
    if arg_start == 0 || arg_end <= arg_start {
        return Err(io::Error::other("/proc/self/stat has no argv area"));
    }
    let mut end = arg_end;
    if env_start == arg_end || env_start == arg_end + 1 {
        // SAFETY: we are single-threaded (the master has not forked nor
        // started threads), so nothing reads `environ` concurrently. Each
        // entry that points into the original environment area is replaced
        // by a leaked heap copy of the same string, so getenv() keeps working
        // and the original area becomes free for the title.
        unsafe {
            let mut p = libc::environ;
            while !p.is_null() && !(*p).is_null() {
                let s = *p as usize;
                if s >= env_start && s < env_end {
                    let copy = CString::from(std::ffi::CStr::from_ptr(*p));
                    *p = copy.into_raw();
                }
                p = p.add(1);
            }
        }
        end = env_end;
    }
    TITLE_AREA.store(arg_start, Ordering::SeqCst);
    TITLE_LEN.store(end - arg_start, Ordering::SeqCst);
    Ok(())
}

/// Sets the title shown by `ps` and /proc/PID/cmdline (truncated to the
/// space [`init_title`] found). Does nothing if `init_title` failed.
pub fn set_title(title: &str) {
    let start = TITLE_AREA.load(Ordering::SeqCst);
    let len = TITLE_LEN.load(Ordering::SeqCst);
    if start == 0 || len < 2 {
        return;
    }
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, start+len) is this process's own argv/environment
    // string memory, mapped writable by the kernel at exec; init_title moved
    // every environment string out of it and the arguments were parsed
    // before, so nothing else refers to it. Title updates happen in one
    // thread (the master before fork, or a worker before it starts threads).
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&bytes[..n]);
        area[n..].fill(0);
    }
}

/// A zeroed array of `n` atomics in memory shared with every process forked
/// after this call (`MAP_SHARED | MAP_ANONYMOUS`). The mapping lives as long
/// as the process: the slice is never unmapped.
pub fn shared_atomics(n: usize) -> io::Result<&'static [AtomicU64]> {
    let len = n
        .checked_mul(std::mem::size_of::<AtomicU64>())
        .and_then(std::num::NonZeroUsize::new)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad scoreboard size"))?;
    // SAFETY: a fresh anonymous mapping aliases no Rust object; the
    // arguments are valid (no fd, offset 0, nonzero length).
    let ptr = unsafe {
        nix::sys::mman::mmap_anonymous(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
        )
    }?;
    // SAFETY: the mapping is `len` bytes, page-aligned (so aligned for
    // AtomicU64), zero-filled (a valid AtomicU64 is any bit pattern), and
    // never unmapped, so the 'static lifetime holds. Other processes write
    // it only through atomics too.
    Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<AtomicU64>(), n) })
}

/// Milliseconds of CLOCK_MONOTONIC_COARSE: the same clock in every process
/// of the machine, read through the vDSO (no system call), to a few
/// milliseconds. The scoreboard's heartbeats and connection starts use it.
pub fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own; the clock id
    // is valid on every Linux since 2.6.32, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{F_GETFD, F_SETFD, FdFlag, fcntl};
    let mut flags = FdFlag::from_bits_truncate(fcntl(fd, F_GETFD)?);
    flags.set(FdFlag::FD_CLOEXEC, on);
    fcntl(fd, F_SETFD(flags))?;
    Ok(())
}

/// Takes ownership of descriptor `fd`, inherited across exec, after
/// checking that it is open; marks it close-on-exec.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: borrowed only for this call; on a descriptor that is not open
    // fcntl fails with EBADF and nothing else happens.
    nix::fcntl::fcntl(unsafe { BorrowedFd::borrow_raw(fd) }, nix::fcntl::F_GETFD)?;
    // SAFETY: the descriptor is open (checked above) and was handed to this
    // process by the previous master for the caller alone; the caller takes
    // each one once (the variable naming it is removed from the
    // environment before anything else can read it).
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    set_cloexec(std::os::fd::AsFd::as_fd(&owned), true)?;
    Ok(owned)
}

/// The soft `RLIMIT_NOFILE` this process started with, when
/// [`raise_nofile`] raised it (0: not raised). Programs the workers start
/// get it back, as Go's runtime does: a raised soft limit breaks programs
/// that still use select(2).
static ORIGINAL_NOFILE: AtomicU64 = AtomicU64::new(0);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do, so that an event-driven
/// worker can hold `worker_connections` sockets. Returns (from, to) when
/// it changed anything.
pub fn raise_nofile() -> io::Result<Option<(u64, u64)>> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    ORIGINAL_NOFILE.store(soft, Ordering::Relaxed);
    Ok(Some((soft, hard)))
}

/// Runs `f` with the soft `RLIMIT_NOFILE` this process started with (for
/// a binary upgrade's new master, which raises it again and so knows what
/// to give its programs back), then raises it again.
pub fn with_original_nofile<T>(f: impl FnOnce() -> T) -> T {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let original = ORIGINAL_NOFILE.load(Ordering::Relaxed);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return f();
    };
    if original == 0 || setrlimit(Resource::RLIMIT_NOFILE, original, hard).is_err() {
        return f();
    }
    let out = f();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, hard);
    out
}

/// Removes variables from this process's environment; refuses (and
/// changes nothing) unless the process is single-threaded.
pub fn remove_env(names: &[&str]) -> io::Result<()> {
    assert_single_threaded()?;
    for name in names {
        // SAFETY: the process has one thread (checked above), so nothing
        // reads or writes the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Privileges.

/// Drops this process (a freshly forked worker, still single-threaded) to
/// `uid`, `gid` and the supplementary `groups`: the groups first, then the
/// gid, then the uid (the only order that works: each step needs the
/// privilege the next one removes). Then checks the result, and that root
/// cannot be regained. `user` only names the user in messages. Returns the
/// reason on failure, for the worker's `error:` message. Clears the
/// inheritable and ambient capability sets first (they survive setuid), and
/// for a non-root user checks that no capability set is left (CapInh,
/// CapPrm, CapEff, CapAmb of /proc/self/status).
pub fn drop_privileges(
    user: &str,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    groups: &[nix::unistd::Gid],
) -> Result<(), String> {
    use nix::unistd::{Gid, Uid};
    let who = format!("user {user:?} (uid {uid}, gid {gid})");
    let fail = |step: &str, e: nix::errno::Errno| {
        let hint = if e == nix::errno::Errno::EPERM && !Uid::effective().is_root() {
            " (the master must run as root to change users)"
        } else {
            ""
        };
        format!("cannot drop privileges to {who}: {step} failed: {e}{hint}")
    };
    // Inheritable and ambient capabilities survive setuid (systemd's
    // AmbientCapabilities= puts them there): cleared first, while lowering
    // them is still allowed whatever the rest of the state.
    clear_inheritable_capabilities().map_err(|e| {
        format!("cannot drop privileges to {who}: clearing the inheritable and ambient capabilities failed: {e}")
    })?;
    nix::unistd::setgroups(groups).map_err(|e| fail("setgroups", e))?;
    nix::unistd::setgid(gid).map_err(|e| fail("setgid", e))?;
    nix::unistd::setuid(uid).map_err(|e| fail("setuid", e))?;
    let ids = (
        Uid::current(),
        Uid::effective(),
        Gid::current(),
        Gid::effective(),
    );
    if ids != (uid, uid, gid, gid) {
        return Err(format!(
            "dropped privileges to {who}, but runs as uid {}/{} gid {}/{}",
            ids.0, ids.1, ids.2, ids.3
        ));
    }
    if !uid.is_root() {
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(format!(
                "dropped privileges to {who}, but setuid(0) still succeeds"
            ));
        }
        if gid.as_raw() != 0 && nix::unistd::setgid(Gid::from_raw(0)).is_ok() {
            return Err(format!(
                "dropped privileges to {who}, but setgid(0) still succeeds"
            ));
        }
        let left = capabilities_left();
        if let Some((set, mask)) = left {
            return Err(format!(
                "dropped privileges to {who}, but capability set {set} is still {mask:016x}"
            ));
        }
    }
    Ok(())
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one of the two 32-bit halves.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, in two halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// This thread's capability sets, from capget(2).
fn capget() -> io::Result<[CapData; 2]> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are valid, writable and of the layout the
    // kernel expects for version 3 (two data structs).
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

/// Clears the ambient set (prctl PR_CAP_AMBIENT_CLEAR_ALL) and the
/// inheritable set (capset), keeping the effective and permitted sets.
fn clear_inheritable_capabilities() -> io::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers; the unused
    // arguments must be zero.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    // EINVAL: a kernel without ambient capabilities (before 4.3), which
    // has none to clear.
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    let mut data = capget()?;
    if data.iter().all(|d| d.inheritable == 0) {
        return Ok(());
    }
    for d in &mut data {
        d.inheritable = 0;
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: as in capget; the kernel only reads data. Lowering the
    // inheritable set needs no privilege.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first of CapInh, CapPrm, CapEff, CapAmb that is not empty, and its
/// mask: from /proc/self/status, or capget(2) (no ambient set) without
/// /proc.
fn capabilities_left() -> Option<(&'static str, u64)> {
    const SETS: [&str; 4] = ["CapInh", "CapPrm", "CapEff", "CapAmb"];
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Some(set) = SETS.iter().find(|s| **s == key) else {
                continue;
            };
            let mask = u64::from_str_radix(value.trim(), 16).unwrap_or(u64::MAX);
            if mask != 0 {
                return Some((set, mask));
            }
        }
        return None;
    }
    let data = capget().ok()?;
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    [
        ("CapInh", join(|d| d.inheritable)),
        ("CapPrm", join(|d| d.permitted)),
        ("CapEff", join(|d| d.effective)),
    ]
    .into_iter()
    .find(|(_, m)| *m != 0)
}

// ---------------------------------------------------------------------------
// What the master samples about its listeners and workers.

/// A TCP listener's accept queue: (connections waiting to be accepted,
/// backlog), from TCP_INFO (`tcpi_unacked` and `tcpi_sacked` mean that on
/// a socket in LISTEN state). None for other sockets or on error.
pub fn listen_queue(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let (info, _) = tcp_info(fd)?;
    // TCP_LISTEN is 10 in the kernel's tcp_states.h.
    if info.tcpi_state != 10 {
        return None;
    }
    Some((u64::from(info.tcpi_unacked), u64::from(info.tcpi_sacked)))
}

/// getsockopt(TCP_INFO): the struct, and how many bytes of it the kernel
/// filled (older kernels know fewer fields). None for a socket that is not
/// TCP, or on error.
fn tcp_info(fd: BorrowedFd<'_>) -> Option<(libc::tcp_info, usize)> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is a descriptor the caller borrows for this call; the
    // kernel writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len as usize))
}

/// A TCP connection's totals: (bytes received, bytes sent), whoever read
/// or wrote them (a program run by `exec` owns the socket). Sent is what
/// the peer acknowledged plus what is still queued (SIOCOUTQ: not yet
/// acknowledged), so the count is exact at any moment. None for other
/// sockets, or a kernel without the counters.
pub fn tcp_bytes(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let (info, len) = tcp_info(fd)?;
    // The kernel writes as much of the struct as it knows: the counters
    // came in Linux 4.1 and 4.2.
    if len < std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8 {
        return None;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int, which we own.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    let queued = if rc == 0 { queued.max(0) as u64 } else { 0 };
    // A FIN takes a sequence number, which the counters include: one off
    // each way once it was received or sent (tcp_states.h: FIN_WAIT1 4,
    // FIN_WAIT2 5, TIME_WAIT 6, CLOSE 7, CLOSE_WAIT 8, LAST_ACK 9,
    // CLOSING 11; a connection CLOSE after both FINs, the usual end, or
    // after a reset, which this counts one byte short each way).
    let state = info.tcpi_state;
    let fin_in = matches!(state, 6..=9 | 11);
    let fin_out = matches!(state, 4..=7 | 9 | 11);
    let received = info.tcpi_bytes_received.saturating_sub(u64::from(fin_in));
    let sent = (info.tcpi_bytes_acked + queued).saturating_sub(u64::from(fin_out));
    Some((received, sent))
}

/// Resident memory of process `pid` in bytes, from /proc/PID/statm (its
/// second field, in pages). None if the process is gone.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(page_size()))
}

fn page_size() -> u64 {
    static SIZE: AtomicU64 = AtomicU64::new(0);
    let cached = SIZE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let n = if n > 0 { n as u64 } else { 4096 };
    SIZE.store(n, Ordering::Relaxed);
    n
}

/// pidfd_open(2): a descriptor that polls readable when process `pid` exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to process group `pgid`; a group already gone is no error.
pub fn kill_group(pgid: u32, sig: Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), sig);
}

/// What [`spawn_program`] runs: everything prepared in the parent, so that
/// the child only makes system calls.
pub struct ProgramSpawn {
    /// The program's path.
    pub path: std::ffi::CString,
    /// argv, `argv[0]` first.
    pub argv: Vec<std::ffi::CString>,
    /// The whole environment, `NAME=value`.
    pub envp: Vec<std::ffi::CString>,
    /// Directory to change to, if any.
    pub cwd: Option<std::ffi::CString>,
    /// Descriptors that become the program's 0, 1 and 2.
    pub stdio: [RawFd; 3],
    /// Signals the program gets back at their default: those the worker
    /// handles or ignores (execve resets handled ones, not ignored ones).
    pub default_signals: &'static [libc::c_int],
}

struct SpawnArgs<'a> {
    spec: &'a ProgramSpawn,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    /// errno of the step that failed in the child, 0 if execve succeeded.
    err: i32,
}

extern "C" fn spawn_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the SpawnArgs the parent passed to clone(2); with
    // CLONE_VM|CLONE_VFORK the parent thread is suspended until this child
    // calls execve or _exit, so the struct is alive and nobody else touches
    // it. Only raw system calls follow: no allocation, no lock, no libc
    // state shared with the parent's other threads.
    unsafe {
        let a = &mut *(arg as *mut SpawnArgs<'_>);
        let fail = |a: &mut SpawnArgs<'_>| -> libc::c_int {
            a.err = *libc::__errno_location();
            if a.err == 0 {
                a.err = libc::EINVAL;
            }
            libc::_exit(127)
        };
        // The program dies with its worker, and leads its own group.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return fail(a);
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(a);
        }
        // Dispositions are this child's own (no CLONE_SIGHAND).
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for &sig in a.spec.default_signals {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        for (target, &fd) in a.spec.stdio.iter().enumerate() {
            let target = target as libc::c_int;
            if fd == target {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return fail(a);
                }
            } else if libc::dup2(fd, target) < 0 {
                return fail(a);
            }
        }
        if let Some(cwd) = &a.spec.cwd
            && libc::chdir(cwd.as_ptr()) != 0
        {
            return fail(a);
        }
        // The open files limit the master started with (raise_nofile).
        let original = ORIGINAL_NOFILE.load(Ordering::Relaxed);
        if original != 0 {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = original as libc::rlim_t;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.spec.path.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
        fail(a)
    }
}

/// Starts a program the way posix_spawn(3) does (clone with CLONE_VM and
/// CLONE_VFORK: no copy of the worker's memory, which a fork of a
/// multi-threaded worker per connection would cost), with what posix_spawn
/// cannot do: PR_SET_PDEATHSIG(SIGKILL), so the program dies with its
/// worker. It also leads its own process group, starts with an empty signal
/// mask and `spec.default_signals` at their default, and gets `stdio` as its
/// 0, 1, 2 (all other descriptors of the worker are close-on-exec).
/// Returns its pid once it has called execve.
pub fn spawn_program(spec: &ProgramSpawn) -> io::Result<u32> {
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|s| s.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut args = SpawnArgs {
        spec,
        argv: &argv,
        envp: &envp,
        err: 0,
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: all signals are blocked around clone(2), so no handler of the
    // worker runs on the child's stack before it resets them; the child runs
    // `spawn_child` on `stack` (alive until clone returns: CLONE_VFORK
    // suspends this thread until the child has exec'd or exited), with
    // `args`, which outlives the call for the same reason. The stack grows
    // down on every Linux target this builds for, so its top is passed.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let top = stack.as_mut_ptr().add(stack.len());
        let top = top.sub(top as usize % 16);
        let pid = libc::clone(
            spawn_child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut args as *mut SpawnArgs<'_> as *mut libc::c_void,
        );
        let clone_err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(clone_err);
        }
        pid
    };
    drop(stack);
    if args.err != 0 {
        // It failed before execve and has exited: reap it.
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        return Err(io::Error::from_raw_os_error(args.err));
    }
    Ok(pid as u32)
}

/// A path split into its directory, opened (`O_PATH|O_DIRECTORY`), and its
/// last component, so that what follows acts on that directory entry
/// relative to the descriptor (the `*at` calls).
fn parent_and_name(path: &std::path::Path) -> io::Result<(OwnedFd, CString)> {
    use std::os::unix::ffi::OsStrExt;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let dir = nix::fcntl::open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let name = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    Ok((dir, name))
}

/// An `O_PATH` descriptor of the directory entry at `path` itself: a
/// symlink in the last component is opened as the link, never followed
/// (open(2): `O_PATH|O_NOFOLLOW`). [`std::fs::File::from`] it and call
/// `metadata()` to see what it is; change it with [`chown_fd`] and
/// [`chmod_fd`], which act on that inode whatever the path names by then.
pub fn open_entry_nofollow(path: &std::path::Path) -> io::Result<OwnedFd> {
    let (dir, name) = parent_and_name(path)?;
    // SAFETY: `dir` is an open descriptor we own for the whole call and
    // `name` a NUL-terminated string that outlives it; openat only reads
    // them. The result is checked before it is wrapped.
    let fd = unsafe {
        libc::openat(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Changes the owner of the inode `fd` refers to (an `O_PATH` descriptor
/// from [`open_entry_nofollow`] will do): fchownat(fd, "", AT_EMPTY_PATH),
/// no path looked up.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `fd` is borrowed open for the call; the empty path is a
    // static NUL-terminated string; fchownat writes no memory of ours.
    let rc = unsafe {
        libc::fchownat(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Changes the mode of the inode `fd` refers to. fchmod(2) refuses an
/// `O_PATH` descriptor, and on a socket's own descriptor it would change
/// the socket, not its file; /proc/self/fd/N names exactly the inode the
/// descriptor holds (the kernel resolves it without a path lookup), so
/// chmod through it cannot be redirected by a symlink.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    std::fs::set_permissions(proc, std::fs::Permissions::from_mode(mode))
}

/// Removes the directory entry at `path` if it is still the file with
/// this device and inode (lstat, no symlink followed, relative to the
/// directory's descriptor: unlinkat(2)). Ok(false): something else is
/// there now, or nothing; it is left alone.
pub fn unlink_if_same(path: &std::path::Path, dev: u64, ino: u64) -> io::Result<bool> {
    let (dir, name) = parent_and_name(path)?;
    let dirfd = std::os::fd::AsRawFd::as_raw_fd(&dir);
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `dirfd` is open for the call, `name` NUL-terminated, and `st`
    // a buffer of the right size that fstatat fills when it returns 0.
    let rc = unsafe {
        libc::fstatat(
            dirfd,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // SAFETY: fstatat returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    if st.st_dev != dev || st.st_ino != ino {
        return Ok(false);
    }
    // SAFETY: as for fstatat; unlinkat never follows a symlink, it removes
    // the entry itself.
    if unsafe { libc::unlinkat(dirfd, name.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// Sends descriptor `fd` over the Unix socket `sock` (SCM_RIGHTS), with
/// one byte of data; nonblocking if `sock` is.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let fds = [fd.as_raw_fd()];
    let iov = [io::IoSlice::new(b"f")];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`] on `sock`, close-on-exec,
/// without waiting: Ok(None) when no message is queued.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = match recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut got = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel installed this descriptor in our table
                // for this message alone; nothing else knows its number, so
                // it is owned here (and closed if more than one came).
                let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                got = Some(owned);
            }
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn tcp_totals_count_both_ways() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[1u8; 1000]).unwrap();
        let mut buf = [0u8; 1000];
        server.read_exact(&mut buf).unwrap();
        server.write_all(&[2u8; 300]).unwrap();
        client.read_exact(&mut buf[..300]).unwrap();
        assert_eq!(tcp_bytes(server.as_fd()), Some((1000, 300)));
        // FINs both ways are not bytes.
        client.shutdown(std::net::Shutdown::Both).unwrap();
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        assert_eq!(tcp_bytes(server.as_fd()), Some((1000, 300)));
        server.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(tcp_bytes(server.as_fd()), Some((1000, 300)));
        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(tcp_bytes(unix.as_fd()), None);
    }
}
