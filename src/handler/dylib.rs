//! `dylib`: a handler in a shared library with the versioned C ABI of
//! `include/preforkd_plugin.h`, loaded with `libloading` in each worker
//! after fork (never in the master). The `#[repr(C)]` types here mirror the
//! header, so that a Rust `cdylib` can be a plugin too (see
//! `examples/dylib/menu_dylib.rs`).
//!
//! The library must be an absolute path, and it and every directory up to
//! `/` (as named and behind symlinks) must be owned by root or the master's
//! user and not writable by group or others (sshd's StrictModes rule, with
//! no exception for sticky directories such as /tmp): whoever can write it
//! runs code as the worker.
//!
//! `preforkd check` runs as root (the unit's ExecStartPre) but never runs
//! the library's code as root: it reads the entry symbol from the file's
//! dynamic symbol table, then loads the library in a child that has
//! dropped to the workers' credentials (`[daemon] user`, else `nobody`),
//! which reports the ABI version and table check over a pipe.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{
    Addr, Connection, Datagram, DatagramHandler, Handlers, PluginContext, PluginInfo, StreamHandler,
};
use crate::sys;

/// `PREFORKD_ABI_VERSION`: the ABI this build of preforkd speaks.
pub const ABI_VERSION: u32 = 1;
/// The exported entry symbol, `preforkd_plugin_entry`.
pub const ENTRY_SYMBOL: &str = "preforkd_plugin_entry";
/// Room given to `serve_datagram` for its reply.
pub const MAX_REPLY: usize = 65536;
/// Room given to `init` for its error message.
const ERR_LEN: usize = 512;

/// `PREFORKD_LOG_*` levels for [`Host::log`].
pub const LOG_ERROR: c_int = 0;
/// Warning.
pub const LOG_WARN: c_int = 1;
/// Information.
pub const LOG_INFO: c_int = 2;
/// Debugging.
pub const LOG_DEBUG: c_int = 3;

/// `struct preforkd_host`.
#[repr(C)]
pub struct Host {
    /// `sizeof(struct preforkd_host)`.
    pub size: u32,
    /// Nonzero once the worker is asked to stop.
    pub shutting_down: Option<unsafe extern "C" fn() -> c_int>,
    /// One line to the log.
    pub log: Option<unsafe extern "C" fn(level: c_int, msg: *const c_char)>,
}

/// `struct preforkd_conn`.
#[repr(C)]
pub struct Conn {
    /// The service's name.
    pub service: *const c_char,
    /// The peer's address, as text.
    pub peer: *const c_char,
    /// The local address, as text.
    pub local: *const c_char,
    /// `AF_INET`, `AF_INET6` or `AF_UNIX`.
    pub family: c_int,
}

/// `init`.
pub type InitFn = unsafe extern "C" fn(
    options_json: *const c_char,
    host: *const Host,
    state: *mut *mut c_void,
    err: *mut c_char,
    errlen: usize,
) -> c_int;
/// `serve_stream`.
pub type ServeStreamFn =
    unsafe extern "C" fn(state: *mut c_void, fd: c_int, conn: *const Conn) -> c_int;
/// `serve_datagram`.
pub type ServeDatagramFn = unsafe extern "C" fn(
    state: *mut c_void,
    data: *const u8,
    len: usize,
    conn: *const Conn,
    reply: *mut u8,
    reply_len: *mut usize,
) -> c_int;
/// `finish`.
pub type FinishFn = unsafe extern "C" fn(state: *mut c_void);

/// `struct preforkd_plugin`: what the entry function returns.
#[repr(C)]
pub struct Plugin {
    /// Must be [`ABI_VERSION`].
    pub abi_version: u32,
    /// `sizeof(struct preforkd_plugin)`.
    pub size: u32,
    /// The plugin's name (NUL-terminated, static).
    pub name: *const c_char,
    /// Per-worker initialisation.
    pub init: Option<InitFn>,
    /// Serves one stream connection.
    pub serve_stream: Option<ServeStreamFn>,
    /// Answers one datagram.
    pub serve_datagram: Option<ServeDatagramFn>,
    /// Called once when the worker stops.
    pub finish: Option<FinishFn>,
    /// Must be null.
    pub reserved: [*mut c_void; 4],
}

// SAFETY: the table is static and immutable (the header requires it); the
// raw pointers in it are only read.
unsafe impl Sync for Plugin {}

/// `preforkd_plugin_entry`'s type.
pub type EntryFn = unsafe extern "C" fn() -> *const Plugin;

impl Host {
    /// For a Rust plugin: whether the worker is asked to stop.
    pub fn is_shutting_down(&self) -> bool {
        // SAFETY: preforkd's host_shutting_down has no preconditions.
        self.shutting_down.is_some_and(|f| unsafe { f() } != 0)
    }

    /// For a Rust plugin: one line to preforkd's log (a plugin's own
    /// `log` macros go nowhere: it has its own copy of the `log` crate).
    pub fn log_line(&self, level: c_int, msg: &str) {
        if let Some(f) = self.log {
            let msg = text(msg.to_string());
            // SAFETY: msg is NUL-terminated and outlives the call.
            unsafe { f(level, msg.as_ptr()) };
        }
    }
}

/// For a Rust plugin's `extern "C"` callbacks: runs `f`, and turns a panic
/// into `on_panic` plus an error line in preforkd's log (through `host`,
/// when known), so that a panic never unwinds across the C ABI.
///
/// ```
/// use preforkd::handler::dylib::guard;
/// let rc = guard(None, "serve_stream", -1, || -> i32 { panic!("bad input") });
/// assert_eq!(rc, -1);
/// ```
pub fn guard<T>(host: Option<&Host>, what: &str, on_panic: T, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            if let Some(h) = host {
                h.log_line(LOG_ERROR, &format!("{what} panicked: {msg}"));
            }
            on_panic
        }
    }
}

unsafe extern "C" fn host_shutting_down() -> c_int {
    sys::shutdown_requested() as c_int
}

unsafe extern "C" fn host_log(level: c_int, msg: *const c_char) {
    if msg.is_null() {
        return;
    }
    // SAFETY: the header requires a NUL-terminated string, valid for the call.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    let text = text.trim_end_matches('\n');
    match level {
        LOG_ERROR => log::error!("dylib plugin: {text}"),
        LOG_WARN => log::warn!("dylib plugin: {text}"),
        LOG_INFO => log::info!("dylib plugin: {text}"),
        _ => log::debug!("dylib plugin: {text}"),
    }
}

static HOST: Host = Host {
    size: std::mem::size_of::<Host>() as u32,
    shutting_down: Some(host_shutting_down),
    log: Some(host_log),
};

const OPTION_PATH: &str = "path";

/// The `path` option, checked: absolute, a regular file, and it and every
/// directory up to `/` (along the path as named and along its real path)
/// owned by root or [`PluginContext::trusted_uid`] and not writable by
/// group or others (sshd's StrictModes rule).
fn library_path(ctx: &PluginContext<'_>) -> Result<PathBuf, String> {
    let path = match ctx.options.get(OPTION_PATH) {
        Some(toml::Value::String(s)) => PathBuf::from(s),
        Some(_) => return Err("plugin \"dylib\": option \"path\" must be a string".into()),
        None => {
            return Err(
                "plugin \"dylib\" needs option \"path\", the absolute path of the library, e.g. path = \"/usr/lib/preforkd/plugins/libfoo.so\""
                    .into(),
            );
        }
    };
    if !path.is_absolute() {
        return Err(format!(
            "plugin \"dylib\": path {:?} is not absolute; give the library's absolute path",
            path.display().to_string()
        ));
    }
    let real = std::fs::canonicalize(&path)
        .map_err(|e| format!("plugin \"dylib\": library {}: {e}", path.display()))?;
    let meta = std::fs::metadata(&real)
        .map_err(|e| format!("plugin \"dylib\": library {}: {e}", real.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "plugin \"dylib\": library {} is not a file",
            real.display()
        ));
    }
    let trusted = ctx.trusted_uid.as_raw();
    let mut seen = std::collections::BTreeSet::new();
    for p in [&path, &real] {
        strict_mode(p, "library", trusted)?;
        for dir in p.ancestors().skip(1) {
            if seen.insert(dir.to_path_buf()) {
                strict_mode(dir, "directory", trusted)?;
            }
        }
    }
    Ok(path)
}

/// Refuses `p` (followed if a link) unless root or `trusted` owns it and
/// neither group nor others may write it. No exception for sticky
/// directories such as /tmp (nor does sshd make one): whoever may create
/// files in a directory may put a library there before the admin does.
fn strict_mode(p: &Path, what: &str, trusted: u32) -> Result<(), String> {
    let meta = std::fs::metadata(p)
        .map_err(|e| format!("plugin \"dylib\": {what} {}: {e}", p.display()))?;
    let owner = meta.uid();
    if owner != 0 && owner != trusted {
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner))
            .ok()
            .flatten()
            .map(|u| format!(" ({})", u.name))
            .unwrap_or_default();
        let allowed = if trusted == 0 {
            "root".to_string()
        } else {
            format!("root or the master's uid {trusted}")
        };
        return Err(format!(
            "plugin \"dylib\": refusing to load: {what} {} is owned by uid {owner}{name}, not {allowed}; run chown root:root {} (whoever owns it runs code as the workers)",
            p.display(),
            p.display()
        ));
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 {
        return Err(format!(
            "plugin \"dylib\": refusing to load: {what} {} is writable by group or others (mode {:o}); run chmod go-w on it, or install the library in a directory only root can write",
            p.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// A loaded library and its checked table.
struct Loaded {
    /// Never unloaded: a plugin may have started threads or registered
    /// thread-local destructors; the worker exits soon after anyway.
    _lib: ManuallyDrop<libloading::Library>,
    table: &'static Plugin,
    name: String,
}

/// Loads the library and checks its table (the entry symbol, the ABI
/// version, the reserved fields). Runs the library's constructors and the
/// entry function, nothing else.
fn load(path: &Path) -> Result<Loaded, String> {
    let shown = path.display();
    // SAFETY: loading a library runs its constructors; the header forbids
    // them side effects, and the path passed the ownership/mode checks.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("plugin \"dylib\": cannot load {shown}: {e}"))?;
    // SAFETY: the symbol's type is the header's `preforkd_plugin_entry`.
    let entry: EntryFn = unsafe { lib.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| {
            format!("plugin \"dylib\": {shown} has no symbol {ENTRY_SYMBOL} ({e}); is it a preforkd plugin?")
        })?;
    // SAFETY: the header requires the entry function to return a pointer to
    // a static table, with no side effects.
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(format!(
            "plugin \"dylib\": {shown}: {ENTRY_SYMBOL}() returned NULL"
        ));
    }
    // SAFETY: checked non-null; the table is static, and the library is never
    // unloaded (ManuallyDrop), so 'static holds. Only abi_version is read
    // before the version is known to match (it is the first field in every
    // version).
    let version = unsafe { (*table).abi_version };
    if version != ABI_VERSION {
        return Err(format!(
            "plugin \"dylib\": {shown} has ABI version {version}, this preforkd speaks version {ABI_VERSION}; rebuild the plugin against this preforkd's include/preforkd_plugin.h"
        ));
    }
    // SAFETY: as above; the version matches, so the layout is ours.
    let table: &'static Plugin = unsafe { &*table };
    if (table.size as usize) < std::mem::size_of::<Plugin>() {
        return Err(format!(
            "plugin \"dylib\": {shown}: its table is {} bytes, version {ABI_VERSION} needs {}",
            table.size,
            std::mem::size_of::<Plugin>()
        ));
    }
    let name = if table.name.is_null() {
        "(unnamed)".to_string()
    } else {
        // SAFETY: a static NUL-terminated string per the header.
        unsafe { CStr::from_ptr(table.name) }
            .to_string_lossy()
            .into_owned()
    };
    Ok(Loaded {
        _lib: ManuallyDrop::new(lib),
        table,
        name,
    })
}

/// The options handed to `init`: the table without `path`, as JSON.
fn options_json(ctx: &PluginContext<'_>) -> Result<CString, String> {
    let mut opts = ctx.options.clone();
    opts.remove(OPTION_PATH);
    let json = serde_json::to_string(&opts)
        .map_err(|e| format!("plugin \"dylib\": options as JSON: {e}"))?;
    CString::new(json).map_err(|_| "plugin \"dylib\": an option contains a NUL byte".into())
}

/// A loaded, initialised plugin: the handler for both kinds.
struct Dylib {
    loaded: Loaded,
    state: *mut c_void,
    service: CString,
}

// SAFETY: the header requires serve_stream/serve_datagram to be
// thread-safe with a shared state pointer; `state` is never written after
// init.
unsafe impl Send for Dylib {}
// SAFETY: as above.
unsafe impl Sync for Dylib {}

impl Drop for Dylib {
    fn drop(&mut self) {
        if let Some(finish) = self.loaded.table.finish {
            // SAFETY: the state init produced, once, after serving has ended
            // (the last handle is dropped when the worker stops serving).
            unsafe { finish(self.state) };
        }
    }
}

fn family(a: &Addr) -> c_int {
    match a {
        Addr::Inet(s) if s.is_ipv4() => libc::AF_INET,
        Addr::Inet(_) => libc::AF_INET6,
        Addr::Unix(_) => libc::AF_UNIX,
    }
}

fn text(s: String) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

fn build(ctx: &PluginContext<'_>) -> Result<Handlers, String> {
    let path = library_path(ctx)?;
    let loaded = load(&path)?;
    let options = options_json(ctx)?;
    let mut state: *mut c_void = std::ptr::null_mut();
    if let Some(init) = loaded.table.init {
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: all pointers are valid for the call; err has ERR_LEN bytes.
        let rc = unsafe {
            init(
                options.as_ptr(),
                &HOST,
                &mut state,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if rc != 0 {
            err[ERR_LEN - 1] = 0;
            // SAFETY: NUL-terminated just above at the latest.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            let msg = if msg.is_empty() {
                format!("init returned {rc}")
            } else {
                msg.into_owned()
            };
            return Err(format!(
                "plugin \"dylib\": {} ({}): init failed: {msg}",
                loaded.name,
                path.display()
            ));
        }
    }
    let stream = loaded.table.serve_stream.is_some();
    let datagram = loaded.table.serve_datagram.is_some();
    log::debug!(
        "dylib plugin {} loaded from {} for service {}",
        loaded.name,
        path.display(),
        ctx.service
    );
    let h = std::sync::Arc::new(Dylib {
        loaded,
        state,
        service: text(ctx.service.to_string()),
    });
    let mut handlers = Handlers::default();
    if stream {
        handlers.stream = Some(h.clone());
    }
    if datagram {
        handlers.datagram = Some(h);
    }
    Ok(handlers)
}

/// `preforkd check`: the path rules, the entry symbol read from the file's
/// dynamic symbol table (no code runs), then the library loaded in a child
/// that first drops to the workers' credentials when run as root
/// (`[daemon] user`, else `nobody`), which reports what the worker would
/// (the ABI version, the table) over a pipe. Plugin code never runs as root
/// here.
fn check(ctx: &PluginContext<'_>) -> Result<(), String> {
    let path = library_path(ctx)?;
    options_json(ctx)?;
    let shown = path.display();
    match elf::exports(&path, ENTRY_SYMBOL) {
        Ok(Some(true)) | Ok(None) => {}
        Ok(Some(false)) => {
            return Err(format!(
                "plugin \"dylib\": {shown} has no symbol {ENTRY_SYMBOL} (not in its dynamic symbol table); is it a preforkd plugin?"
            ));
        }
        Err(e) => {
            return Err(format!(
                "plugin \"dylib\": cannot load {shown}: {e}; give the path of a shared library built against include/preforkd_plugin.h"
            ));
        }
    }
    let creds = if nix::unistd::Uid::effective().is_root() {
        Some(match ctx.credentials {
            Some(c) => c.clone(),
            None => nobody()?,
        })
    } else {
        None
    };
    load_in_child(&path, creds.as_ref())
}

/// `nobody`, for a check as root with no `[daemon] user`.
fn nobody() -> Result<crate::config::Credentials, String> {
    let user = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .ok_or_else(|| {
            "plugin \"dylib\": check runs as root and there is no [daemon] user, nor a user \"nobody\" to load the library as; set [daemon] user".to_string()
        })?;
    Ok(crate::config::Credentials {
        user: user.name,
        uid: user.uid,
        gid: user.gid,
        groups: vec![user.gid],
    })
}

/// How long the check's child may take to load the library.
const CHILD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Loads `path` in a forked child, after dropping to `creds` if given; the
/// child writes "ok" or the error over a pipe and exits.
fn load_in_child(path: &Path, creds: Option<&crate::config::Credentials>) -> Result<(), String> {
    use std::io::{Read, Write};
    let shown = path.display();
    let as_user = creds
        .map(|c| format!(" as user {:?}", c.user))
        .unwrap_or_default();
    let (rd, wr) = nix::unistd::pipe()
        .map_err(|e| format!("plugin \"dylib\": cannot check {shown}: pipe: {e}"))?;
    // SAFETY: `preforkd check` is single-threaded; the child only drops
    // privileges, loads the library, writes to the pipe and _exits.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("plugin \"dylib\": cannot check {shown}: fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            let result = match creds {
                Some(c) => sys::drop_privileges(&c.user, c.uid, c.gid, &c.groups),
                None => Ok(()),
            }
            .and_then(|()| load(path).map(drop));
            let msg = match result {
                Ok(()) => "ok".to_string(),
                Err(e) => e,
            };
            let _ = std::fs::File::from(wr).write_all(msg.as_bytes());
            // SAFETY: _exit ends the child without running the parent's
            // atexit handlers or the library's destructors.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(wr);
            let deadline = std::time::Instant::now() + CHILD_DEADLINE;
            let mut file = std::fs::File::from(rd);
            let mut msg = Vec::new();
            let mut buf = [0u8; 4096];
            let timed_out = loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let mut fds = [nix::poll::PollFd::new(
                    file.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let ms = nix::poll::PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                    .unwrap_or(nix::poll::PollTimeout::ZERO);
                match nix::poll::poll(&mut fds, ms) {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break false,
                }
                match file.read(&mut buf) {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => msg.extend_from_slice(&buf[..n]),
                }
            };
            if timed_out {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            let status = loop {
                match nix::sys::wait::waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            if timed_out {
                return Err(format!(
                    "plugin \"dylib\": loading {shown}{as_user} took over {}s; its constructors or entry function must return at once",
                    CHILD_DEADLINE.as_secs()
                ));
            }
            let msg = String::from_utf8_lossy(&msg).into_owned();
            match status {
                Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => Err(format!(
                    "plugin \"dylib\": loading {shown}{as_user} killed the checking process with {sig}; fix the library's constructors or entry function"
                )),
                _ if msg == "ok" => Ok(()),
                _ if msg.is_empty() => Err(format!(
                    "plugin \"dylib\": loading {shown}{as_user} ended the checking process without a report; fix the library's constructors or entry function"
                )),
                _ => Err(msg),
            }
        }
    }
}

/// A small reader of ELF dynamic symbol tables, for `check`: whether a
/// library exports a symbol, without loading it.
mod elf {
    use std::path::Path;

    /// The largest file read.
    const MAX_SIZE: u64 = 1 << 30;

    /// Whether `path`'s dynamic symbol table (.dynsym) defines `name` as a
    /// global or weak symbol of default or protected visibility. None: the
    /// file has no section headers to find it by (the load decides).
    pub(super) fn exports(path: &Path, name: &str) -> Result<Option<bool>, String> {
        let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        if size > MAX_SIZE {
            return Err(format!("the file is over {MAX_SIZE} bytes"));
        }
        let data = std::fs::read(path).map_err(|e| e.to_string())?;
        exports_in(&data, name)
    }

    struct Reader<'a> {
        data: &'a [u8],
        big: bool,
        wide: bool,
    }

    impl Reader<'_> {
        fn bytes(&self, off: u64, n: usize) -> Result<&[u8], String> {
            let off = usize::try_from(off).map_err(|_| truncated())?;
            self.data
                .get(off..off.checked_add(n).ok_or_else(truncated)?)
                .ok_or_else(truncated)
        }
        fn u16(&self, off: u64) -> Result<u64, String> {
            let b: [u8; 2] = self.bytes(off, 2)?.try_into().unwrap();
            Ok(u64::from(if self.big {
                u16::from_be_bytes(b)
            } else {
                u16::from_le_bytes(b)
            }))
        }
        fn u32(&self, off: u64) -> Result<u64, String> {
            let b: [u8; 4] = self.bytes(off, 4)?.try_into().unwrap();
            Ok(u64::from(if self.big {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }))
        }
        /// An address or offset: 8 bytes in ELF64, 4 in ELF32.
        fn word(&self, off: u64) -> Result<u64, String> {
            if self.wide {
                let b: [u8; 8] = self.bytes(off, 8)?.try_into().unwrap();
                Ok(if self.big {
                    u64::from_be_bytes(b)
                } else {
                    u64::from_le_bytes(b)
                })
            } else {
                self.u32(off)
            }
        }
    }

    fn truncated() -> String {
        "the file is not a valid ELF shared library (truncated headers)".into()
    }

    pub(super) fn exports_in(data: &[u8], name: &str) -> Result<Option<bool>, String> {
        if data.len() < 20 || &data[..4] != b"\x7fELF" {
            return Err("the file is not an ELF shared library".into());
        }
        let wide = match data[4] {
            1 => false,
            2 => true,
            c => return Err(format!("unknown ELF class {c}")),
        };
        let big = match data[5] {
            1 => false,
            2 => true,
            d => return Err(format!("unknown ELF byte order {d}")),
        };
        let r = Reader { data, big, wide };
        // e_type: ET_DYN.
        if r.u16(16)? != 3 {
            return Err("the file is an ELF file but not a shared library".into());
        }
        let (shoff, shentsize, shnum) = if wide {
            (r.word(0x28)?, r.u16(0x3a)?, r.u16(0x3c)?)
        } else {
            (r.word(0x20)?, r.u16(0x2e)?, r.u16(0x30)?)
        };
        if shoff == 0 || shnum == 0 {
            return Ok(None);
        }
        // Section header fields: (sh_type, sh_link, sh_offset, sh_size, sh_entsize).
        let section = |i: u64| -> Result<(u64, u64, u64, u64, u64), String> {
            let at = shoff + i * shentsize;
            if wide {
                Ok((
                    r.u32(at + 4)?,
                    r.u32(at + 0x28)?,
                    r.word(at + 0x18)?,
                    r.word(at + 0x20)?,
                    r.word(at + 0x38)?,
                ))
            } else {
                Ok((
                    r.u32(at + 4)?,
                    r.u32(at + 0x18)?,
                    r.word(at + 0x10)?,
                    r.word(at + 0x14)?,
                    r.word(at + 0x24)?,
                ))
            }
        };
        const SHT_DYNSYM: u64 = 11;
        for i in 0..shnum {
            let (kind, link, off, size, entsize) = section(i)?;
            if kind != SHT_DYNSYM {
                continue;
            }
            let (_, _, stroff, strsize, _) = section(link)?;
            let strtab = r.bytes(stroff, usize::try_from(strsize).map_err(|_| truncated())?)?;
            let entsize = if entsize == 0 {
                if wide { 24 } else { 16 }
            } else {
                entsize
            };
            for s in 0..size / entsize {
                let at = off + s * entsize;
                let (st_name, info, other, shndx) = if wide {
                    (
                        r.u32(at)?,
                        r.bytes(at + 4, 1)?[0],
                        r.bytes(at + 5, 1)?[0],
                        r.u16(at + 6)?,
                    )
                } else {
                    (
                        r.u32(at)?,
                        r.bytes(at + 12, 1)?[0],
                        r.bytes(at + 13, 1)?[0],
                        r.u16(at + 14)?,
                    )
                };
                let Some(tail) = strtab.get(st_name as usize..) else {
                    continue;
                };
                let sym = tail.split(|b| *b == 0).next().unwrap_or_default();
                if sym != name.as_bytes() {
                    continue;
                }
                // Defined (not SHN_UNDEF), STB_GLOBAL or STB_WEAK,
                // STV_DEFAULT or STV_PROTECTED.
                let binding = info >> 4;
                let visibility = other & 3;
                if shndx != 0
                    && (binding == 1 || binding == 2)
                    && (visibility == 0 || visibility == 3)
                {
                    return Ok(Some(true));
                }
            }
            return Ok(Some(false));
        }
        Ok(None)
    }
}

pub(super) fn plugin() -> PluginInfo {
    PluginInfo::new(
        "dylib",
        "a shared library with the C ABI of include/preforkd_plugin.h (option path)",
        build,
    )
    .serves(true, true)
    .with_check(check)
}

impl StreamHandler for Dylib {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let Some(serve) = self.loaded.table.serve_stream else {
            return Ok(());
        };
        let peer = text(conn.peer_addr().to_string());
        let local = text(conn.local_addr().to_string());
        let c = Conn {
            service: self.service.as_ptr(),
            peer: peer.as_ptr(),
            local: local.as_ptr(),
            family: family(conn.local_addr()),
        };
        let fd = conn.stream.as_fd().as_raw_fd();
        // SAFETY: fd stays open for the call (borrowed, closed by the
        // worker after); c's strings outlive it; state is init's.
        let rc = unsafe { serve(self.state, fd, &c) };
        if rc != 0 {
            return Err(io::Error::other(format!(
                "dylib plugin {}: serve_stream returned {rc}",
                self.loaded.name
            )));
        }
        Ok(())
    }
}

impl DatagramHandler for Dylib {
    fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
        let Some(serve) = self.loaded.table.serve_datagram else {
            return Ok(false);
        };
        let peer = text(datagram.peer.to_string());
        let local = text(String::new());
        let c = Conn {
            service: self.service.as_ptr(),
            peer: peer.as_ptr(),
            local: local.as_ptr(),
            family: family(datagram.peer),
        };
        reply.clear();
        reply.resize(MAX_REPLY, 0);
        let mut len = MAX_REPLY;
        // SAFETY: data and reply are valid for their lengths; len is the
        // reply's capacity.
        let rc = unsafe {
            serve(
                self.state,
                datagram.data.as_ptr(),
                datagram.data.len(),
                &c,
                reply.as_mut_ptr(),
                &mut len,
            )
        };
        reply.truncate(len.min(MAX_REPLY));
        match rc {
            0 => Ok(false),
            r if r > 0 => Ok(true),
            r => Err(io::Error::other(format!(
                "dylib plugin {}: serve_datagram returned {r}",
                self.loaded.name
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_with(path: &str) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("path".into(), toml::Value::String(path.into()));
        t
    }

    #[test]
    fn relative_missing_and_writable_paths_are_refused() {
        let t = ctx_with("libfoo.so");
        let e = library_path(&PluginContext::new("s", &t, Default::default())).unwrap_err();
        assert!(e.contains("not absolute"), "{e}");
        let t = ctx_with("/nonexistent/libfoo.so");
        let e = library_path(&PluginContext::new("s", &t, Default::default())).unwrap_err();
        assert!(e.contains("/nonexistent/libfoo.so"), "{e}");
        let e = strict_mode(Path::new("/tmp"), "directory", 0).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
    }
}
