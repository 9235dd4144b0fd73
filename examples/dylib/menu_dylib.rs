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

const BANNER: &[u8] =
    b"Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.\n";
const OPERATOR: &[u8] = b"Your call is being transferred to an operator.\n";
const AGAIN: &[u8] =
    b"Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.\n";
const GOODBYE: &[u8] = b"Goodbye.\n";
const MAX_LINE: usize = 1024;

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
        b"0" => (OPERATOR, false),
        b"exit" => (GOODBYE, true),
        b"panic" => panic!("the caller asked for a panic"),
        _ => (AGAIN, false),
    }
}

fn serve(sock: &mut File) -> io::Result<()> {
    send(sock, BANNER)?;
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_LINE);
    let mut chunk = [0u8; MAX_LINE];
    loop {
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let (reply, bye) = answer(&buf[..i]);
            send(sock, reply)?;
            buf.drain(..=i);
            if bye {
                return Ok(());
            }
        }
        if buf.len() >= MAX_LINE {
            send(sock, AGAIN)?;
            buf.clear();
        }
        if buf.is_empty() && host().is_some_and(Host::is_shutting_down) {
            return Ok(()); // a request boundary
        }
        let room = MAX_LINE - buf.len();
        match sock.read(&mut chunk[..room]) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_tick(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

unsafe extern "C" fn init(
    _options_json: *const c_char,
    host: *const Host,
    _state: *mut *mut c_void,
    _err: *mut c_char,
    _errlen: usize,
) -> c_int {
    guard(None, "init", 1, || {
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
