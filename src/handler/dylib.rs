//! `dylib`: a handler in a shared library with the versioned C ABI of
//! `include/preforkd_plugin.h`, loaded with `libloading` in each worker
//! after fork (never in the master). The `#[repr(C)]` types here mirror the
//! header, so that a Rust `cdylib` can be a plugin too (see
//! `examples/dylib/menu_dylib.rs`).
//!
//! The library must be an absolute path, and neither it nor its directory
//! may be writable by group or others (sshd's StrictModes rule): whoever
//! can write it runs code as the worker.

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

/// The `path` option, checked: absolute, a regular file, neither it nor its
/// directory writable by group or others.
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
    strict_mode(&real, "library")?;
    let mut dirs = vec![real.parent().map(Path::to_path_buf)];
    dirs.push(path.parent().map(Path::to_path_buf));
    for dir in dirs.into_iter().flatten() {
        strict_mode(&dir, "directory")?;
    }
    Ok(path)
}

/// Refuses `p` if group or others may write it.
fn strict_mode(p: &Path, what: &str) -> Result<(), String> {
    let meta = std::fs::metadata(p)
        .map_err(|e| format!("plugin \"dylib\": {what} {}: {e}", p.display()))?;
    let mode = meta.mode();
    if mode & 0o022 != 0 {
        return Err(format!(
            "plugin \"dylib\": refusing to load: {what} {} is writable by group or others (mode {:o}); run chmod go-w on it",
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

fn check(ctx: &PluginContext<'_>) -> Result<(), String> {
    let path = library_path(ctx)?;
    load(&path)?;
    options_json(ctx)?;
    Ok(())
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
        let e = strict_mode(Path::new("/tmp"), "directory").unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
    }
}
