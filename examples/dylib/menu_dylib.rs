//! The menu dialogue of docs/MENU.md as a dylib plugin written in Rust: a
//! `cdylib` exporting the C ABI of include/preforkd_plugin.h with the
//! mirror types of `preforkd::handler::dylib`.
//!
//! ```text
//! cargo build --example menu_dylib      # target/debug/examples/libmenu_dylib.so
//! ```
//!
//! Every callback runs inside `guard`: a panic (send the choice `panic` to
//! see one) becomes an error code and a log line, never an unwind across
//! the C ABI; the worker closes that connection and goes on serving.

use std::ffi::{c_char, c_int, c_void};
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use preforkd::handler::dylib::{ABI_VERSION, Conn, Host, LOG_INFO, Plugin, guard};

/// What the menu says (docs/MENU.md): banner, operator, again, goodbye.
type Texts = [&'static [u8]; 4];

/// The socketserver tutorial's own texts (the default).
const ZH: Texts = [
    "欢迎致电 10086,请输入1xxx,0转人工服务.\n".as_bytes(),
    "通过可能会被录音.balabala一大推\n".as_bytes(),
    "请重新输入.\n".as_bytes(),
    b"",
];

/// docs/MENU.md's English texts: options `language = "en"`.
const EN: Texts = [
    b"Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.\n",
    b"Your call is being transferred to an operator.\n",
    b"Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.\n",
    b"Goodbye.\n",
];

/// The most one read takes: a longer choice is answered in pieces.
const MAX_READ: usize = 1024;

/// The texts chosen by `init`.
static TEXTS: OnceLock<&'static Texts> = OnceLock::new();

fn texts() -> &'static Texts {
    TEXTS.get().copied().unwrap_or(&ZH)
}

/// The host table, valid for the worker's life.
struct HostRef(&'static Host);
// SAFETY: the host table is static and immutable in preforkd.
unsafe impl Send for HostRef {}
// SAFETY: as above.
unsafe impl Sync for HostRef {}

static HOST: OnceLock<HostRef> = OnceLock::new();

fn host() -> Option<&'static Host> {
    HOST.get().map(|h| h.0)
}

/// A tick of the socket's SO_RCVTIMEO/SO_SNDTIMEO, or a signal.
fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Writes all of `buf`: the answer is owed, ticks or not.
fn send(sock: &mut File, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if is_tick(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The answer to one choice, and whether the caller is let go.
fn answer(line: &[u8]) -> (&'static [u8], bool) {
    let [_, operator, again, goodbye] = *texts();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let choice = line.trim_ascii_start();
    let choice = {
        let mut c = choice;
        while let Some(rest) = c.strip_suffix(b" ").or_else(|| c.strip_suffix(b"\t")) {
            c = rest;
        }
        c
    };
    match choice {
        b"0" => (operator, false),
        b"exit" => (goodbye, true),
        b"panic" => panic!("the caller asked for a panic"),
        _ => (again, false),
    }
}

/// A choice is a line, or what one read delivered after its last newline
/// (the tutorial's client sends a choice with no newline and waits).
fn serve(sock: &mut File) -> io::Result<()> {
    send(sock, texts()[0])?;
    let mut buf = [0u8; MAX_READ];
    loop {
        if host().is_some_and(Host::is_shutting_down) {
            return Ok(()); // waiting for a choice: a request boundary
        }
        let n = match sock.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if is_tick(&e) => continue,
            Err(e) => return Err(e),
        };
        let data = buf[..n].strip_suffix(b"\n").unwrap_or(&buf[..n]);
        for choice in data.split(|&b| b == b'\n') {
            let (reply, bye) = answer(choice);
            send(sock, reply)?;
            if bye {
                return Ok(());
            }
        }
    }
}

unsafe extern "C" fn init(
    options_json: *const c_char,
    host: *const Host,
    _state: *mut *mut c_void,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    guard(None, "init", 1, || {
        // SAFETY: preforkd passes a NUL-terminated JSON object, valid for
        // the call.
        let options = unsafe { std::ffi::CStr::from_ptr(options_json) }.to_string_lossy();
        let options: serde_json::Value = serde_json::from_str(&options).unwrap_or_default();
        let texts = match options.get("language").and_then(|v| v.as_str()) {
            None | Some("zh") => &ZH,
            Some("en") => &EN,
            Some(_) => {
                let msg = b"language must be \"zh\" (the tutorial's texts) or \"en\"";
                if errlen > 0 {
                    let n = msg.len().min(errlen - 1);
                    // SAFETY: preforkd passes a buffer of `errlen` bytes; at
                    // most errlen - 1 are written, then the NUL.
                    unsafe {
                        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
                        *err.add(n) = 0;
                    }
                }
                return 1;
            }
        };
        let _ = TEXTS.set(texts);
        // SAFETY: preforkd passes its static host table.
        let h: &'static Host = unsafe { &*host };
        let _ = HOST.set(HostRef(h));
        h.log_line(LOG_INFO, "menu (Rust) ready");
        0
    })
}

unsafe extern "C" fn serve_stream(_state: *mut c_void, fd: c_int, _conn: *const Conn) -> c_int {
    guard(host(), "menu serve_stream", -1, || {
        // SAFETY: the fd is open for the call; ManuallyDrop: it is
        // borrowed, preforkd closes it.
        let mut sock = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        match serve(&mut sock) {
            Ok(()) => 0,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
            Err(_) => -1,
        }
    })
}

static PLUGIN: Plugin = Plugin {
    abi_version: ABI_VERSION,
    size: std::mem::size_of::<Plugin>() as u32,
    name: c"menu-rust".as_ptr(),
    init: Some(init),
    serve_stream: Some(serve_stream),
    serve_datagram: None,
    finish: None,
    reserved: [std::ptr::null_mut(); 4],
};

/// The entry symbol: only returns the static table.
#[unsafe(no_mangle)]
pub extern "C" fn preforkd_plugin_entry() -> *const Plugin {
    &PLUGIN
}
