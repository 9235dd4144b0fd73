//! The `dylib` plugin: C plugins built here with the system `cc`
//! (examples/dylib/menu.c and tests/dylib/test_plugin.c), the Rust cdylib
//! example (examples/dylib/menu_dylib.rs, built by `cargo test`), and the
//! refusals: ABI version, missing symbol, init error, StrictModes.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `src` (relative to the repo) into DIR/NAME with `cc`, mode 0755.
fn cc(dir: &Path, src: &str, name: &str, defines: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall"])
        .arg("-I")
        .arg(repo().join("include"))
        .args(defines)
        .arg("-o")
        .arg(&out)
        .arg(repo().join(src))
        .status()
        .expect("run cc");
    assert!(status.success(), "cc {src} failed");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
    out
}

/// A temp dir for libraries, mode 0755 under target/tmp: the owner rule
/// refuses /tmp (world-writable, sticky or not) anywhere on the path.
fn libdir() -> tempfile::TempDir {
    // The owner rule holds every directory up to / to root and no group or
    // other write: target/tmp where the checkout's path allows it (a clone
    // under /tmp does not), else /run (root's, 0755).
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if trusted_path(target) || !Path::new("/run").is_dir() {
        target
    } else {
        Path::new("/run")
    };
    let dir = tempfile::Builder::new()
        .prefix("pfdlib")
        .tempdir_in(base)
        .expect("a temp dir for the test libraries");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Whether `dir` and every directory above it is root's and not writable
/// by group or others (what the dylib owner rule asks).
fn trusted_path(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0))
}

/// The test plugin, in a private temp dir that the caller keeps alive.
fn test_plugin(defines: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = libdir();
    let lib = cc(
        dir.path(),
        "tests/dylib/test_plugin.c",
        "libtest.so",
        defines,
    );
    (dir, lib)
}

fn dylib_service(listen: &[&str], extra: &str, lib: &Path, options: &str) -> String {
    format!(
        "[control]\nsocket = \"{{dir}}/control.sock\"\n\n{}\n[service.handler.options]\npath = {:?}\n{options}\n",
        service("t", listen, "dylib", extra),
        lib.display().to_string()
    )
}

fn ask(s: &mut (impl std::io::Read + Write), line: &str) -> String {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    read_line(s).unwrap()
}

/// The shipped example config, on port 0, a socket in the test's dir and
/// the library just built.
fn menu_config(lib: &Path) -> String {
    let shipped = std::fs::read_to_string(repo().join("config/examples/menu-dylib.toml")).unwrap();
    let replaced = shipped
        .replace("tcp://127.0.0.1:8012", "tcp://127.0.0.1:0")
        .replace("unix:/tmp/preforkd-menu-dylib.sock", "unix:{dir}/menu.sock")
        .replace(
            "/usr/lib/preforkd/plugins/libmenu.so",
            lib.to_str().unwrap(),
        );
    assert_ne!(shipped, replaced, "the example's addresses changed");
    // The options table is the file's last: English for menu_dialogue.
    format!("{replaced}language = \"en\"\n")
}

#[test]
fn c_menu_plugin_dialogue_over_tcp_and_unix() {
    let dir = libdir();
    let lib = cc(dir.path(), "examples/dylib/menu.c", "libmenu.so", &[]);
    let d = Daemon::start(&menu_config(&lib));
    d.wait_ready();
    menu_dialogue(connect(d.addr("tcp", "menu")).unwrap());
    menu_dialogue(connect_unix(&d.path("menu.sock")).unwrap());
    // The tutorial's client, in its own texts (the plugin's default).
    let zh = Daemon::start(&menu_config(&lib).replace("language = \"en\"\n", ""));
    zh.wait_ready();
    tutorial_client(connect(zh.addr("tcp", "menu")).unwrap());
    tutorial_client(connect_unix(&zh.path("menu.sock")).unwrap());
}

#[test]
fn c_menu_plugin_closes_a_waiting_caller_on_stop() {
    let dir = libdir();
    let lib = cc(dir.path(), "examples/dylib/menu.c", "libmenu.so", &[]);
    let mut d = Daemon::start(&menu_config(&lib));
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "menu")).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_BANNER);
    assert_eq!(ask(&mut s, "0"), MENU_OPERATOR);
    d.signal(libc::SIGTERM);
    assert_eq!(read_to_eof(&mut s).unwrap(), b"", "clean EOF, no RST");
    assert!(d.wait_exit(DEADLINE).success());
    assert!(!d.log_text().contains("SIGKILL"), "{}", d.log_text());
}

/// Start fails with 78 and `reason` in a `failed to boot` line.
fn assert_boot_fails(config: &str, reason: &str) {
    let mut d = Daemon::start(config);
    let status = d.wait_exit(DEADLINE);
    let log = d.log_text();
    assert_eq!(
        status.code(),
        Some(preforkd::exit::code::CONFIG),
        "{status:?}; log:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("failed to boot") && l.contains(reason)),
        "no {reason:?} in the log:\n{log}"
    );
}

/// `preforkd check` exits 78 with the plugin's file:line:col and `reason`.
fn assert_check_fails(config: &str, reason: &str) {
    let dir = tempdir();
    let path = dir.path().join("p.toml");
    let text = config.replace("{dir}", dir.path().to_str().unwrap());
    std::fs::write(&path, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("plugin = \"dylib\""))
        .unwrap()
        + 1;
    let out = run_cli(&path, &["check"]);
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:{line}:10", path.display())) && err.contains(reason),
        "{reason:?}: {}",
        show(&out)
    );
}

#[test]
fn wrong_abi_version_and_missing_symbol_fail_boot_and_check() {
    for (defines, reason) in [
        (
            &["-DTEST_ABI=99"][..],
            "has ABI version 99, this preforkd speaks version 1",
        ),
        (&["-DNO_ENTRY"][..], "has no symbol preforkd_plugin_entry"),
    ] {
        let (_dir, lib) = test_plugin(defines);
        let config = dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "");
        assert_boot_fails(&config, reason);
        assert_check_fails(&config, reason);
    }
    // A good library passes the check.
    let (_dir, lib) = test_plugin(&[]);
    let dir = tempdir();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "")
            .replace("{dir}", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let out = run_cli(&path, &["check"]);
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn init_error_fails_boot_with_its_message() {
    let (_dir, lib) = test_plugin(&[]);
    let config = dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "fail = \"no database\"");
    assert_boot_fails(&config, "init failed: told to fail: no database");
}

#[test]
fn relative_path_and_writable_library_are_refused() {
    let config = dylib_service(&["tcp://127.0.0.1:0"], "", Path::new("libtest.so"), "");
    assert_boot_fails(&config, "is not absolute");
    assert_check_fails(&config, "is not absolute");

    let (dir, lib) = test_plugin(&[]);
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o666)).unwrap();
    let config = dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "");
    assert_boot_fails(&config, "is writable by group or others");
    assert_check_fails(&config, "is writable by group or others");
    // Its directory too.
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_boot_fails(&config, "is writable by group or others");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn reload_to_a_writable_library_is_refused_and_old_generation_serves() {
    let (_dir, lib) = test_plugin(&[]);
    let d = Daemon::start(&dylib_service(
        &["tcp://127.0.0.1:0"],
        "",
        &lib,
        "banner = \"generation one\"",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "t");
    let (_dir2, bad) = test_plugin(&[]);
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o666)).unwrap();
    d.write_config(&dylib_service(
        &["tcp://127.0.0.1:0"],
        "",
        &bad,
        "banner = \"generation two\"",
    ));
    let out = cli(&d, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("failed to boot") && err.contains("writable by group or others"),
        "{err}"
    );
    let mut s = connect(addr).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "generation one\n");
    assert_eq!(ask(&mut s, "hi"), "hi\n");
}

#[test]
fn a_crashing_plugin_kills_its_worker_only() {
    let (_dir, lib) = test_plugin(&[]);
    let d = Daemon::start(&dylib_service(
        &["tcp://127.0.0.1:0"],
        "workers = 2\nthreads = 1",
        &lib,
        "",
    ));
    d.wait_ready();
    d.wait_workers(2);
    let addr = d.addr("tcp", "t");
    // Two connections held open at once, with one thread per worker: one
    // on each worker.
    let mut a = connect(addr).unwrap();
    let pa: i32 = ask(&mut a, "pid").trim().parse().unwrap();
    let mut b = connect(addr).unwrap();
    let pb: i32 = ask(&mut b, "pid").trim().parse().unwrap();
    assert_ne!(pa, pb);
    a.write_all(b"crash\n").unwrap();
    // The connection dies with its worker (EOF or reset).
    let _ = read_to_eof(&mut a);
    assert!(
        wait_for(DEADLINE, || (!alive(pa)).then_some(())).is_some(),
        "worker {pa} still alive"
    );
    assert_eq!(ask(&mut b, "still here"), "still here\n");
    let workers = wait_for(DEADLINE, || {
        let w = d.workers();
        (w.len() == 2 && !w.contains(&pa) && w.iter().all(|p| alive(*p))).then_some(w)
    })
    .unwrap_or_else(|| panic!("no replacement worker; log:\n{}", d.log_text()));
    assert!(workers.contains(&pb));
    drop(b);
    let mut c = connect(addr).unwrap();
    assert_eq!(ask(&mut c, "again"), "again\n");
}

#[test]
fn options_reach_init_as_json_and_datagrams_are_answered() {
    let (_dir, lib) = test_plugin(&[]);
    let d = Daemon::start(&dylib_service(
        &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
        "",
        &lib,
        "banner = \"hello there\"\nlimit = 3",
    ));
    d.wait_ready();
    d.wait_log("test plugin initialised with {\"banner\":\"hello there\",\"limit\":3}");
    let mut s = connect(d.addr("tcp", "t")).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "hello there\n");
    assert_eq!(ask(&mut s, "stop?"), "0\n");
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(DEADLINE)).unwrap();
    u.send_to(b"ping", d.addr("udp", "t")).unwrap();
    let mut buf = [0u8; 512];
    let n = u.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello there|t|ping");
}

/// target/debug/examples/libmenu_dylib.so (next to this test's deps/),
/// copied into a trusted directory (the owner rule) that the caller keeps.
fn rust_menu_lib() -> (tempfile::TempDir, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let built = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/libmenu_dylib.so");
    assert!(
        built.exists(),
        "{} is missing: run `cargo test` (which builds the examples) or `cargo build --example menu_dylib`",
        built.display()
    );
    let dir = libdir();
    let lib = dir.path().join("libmenu_dylib.so");
    std::fs::copy(&built, &lib).unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, lib)
}

#[test]
fn rust_cdylib_menu_dialogue_and_a_contained_panic() {
    let (_libdir, lib) = rust_menu_lib();
    let d = Daemon::start(&dylib_service(
        &["tcp://127.0.0.1:0", "unix:{dir}/menu.sock"],
        "workers = 1\nthreads = 2",
        &lib,
        "language = \"en\"",
    ));
    d.wait_ready();
    d.wait_log("dylib plugin: menu (Rust) ready");
    let addr = d.addr("tcp", "t");
    menu_dialogue(connect(addr).unwrap());
    menu_dialogue(connect_unix(&d.path("menu.sock")).unwrap());
    let worker = d.wait_workers(1)[0];
    // A panic: that connection is closed, the worker goes on.
    let mut s = connect(addr).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_BANNER);
    assert_eq!(ask(&mut s, "0"), MENU_OPERATOR);
    s.write_all(b"panic\n").unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"");
    d.wait_log("menu serve_stream panicked: the caller asked for a panic");
    assert!(alive(worker));
    menu_dialogue(connect(addr).unwrap());
    assert_eq!(d.workers(), vec![worker], "{}", d.log_text());
}

#[test]
fn c_echo_plugin_echoes_streams_and_datagrams() {
    let dir = libdir();
    let lib = cc(dir.path(), "examples/dylib/echo.c", "libecho.so", &[]);
    let d = Daemon::start(&dylib_service(
        &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
        "",
        &lib,
        "",
    ));
    d.wait_ready();
    let addr = d.addr("tcp", "t");
    echo_once(addr, b"hello, dylib\n").unwrap();
    echo_once(addr, &vec![b'x'; 200_000]).unwrap();
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(DEADLINE)).unwrap();
    u.send_to(b"datagram", d.addr("udp", "t")).unwrap();
    let mut buf = [0u8; 64];
    let n = u.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"datagram");
}

#[test]
fn a_library_without_a_datagram_callback_cannot_serve_udp() {
    let dir = libdir();
    let lib = cc(dir.path(), "examples/dylib/menu.c", "libmenu.so", &[]);
    let config = dylib_service(&["udp://127.0.0.1:0"], "", &lib, "");
    assert_boot_fails(&config, "built no datagram handler");
}

#[test]
fn a_reload_picks_up_a_changed_library_file() {
    // An installer replaces the file at the same path (a new file renamed
    // over the old one); the config does not change.
    let dir = libdir();
    let lib = cc(dir.path(), "examples/dylib/echo.c", "libplugin.so", &[]);
    let d = Daemon::start(&dylib_service(
        &["tcp://127.0.0.1:0", "udp://127.0.0.1:0"],
        "",
        &lib,
        "",
    ));
    d.wait_ready();
    let udp = d.addr("udp", "t");
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 512];
    u.send_to(b"ping", udp).unwrap();
    let n = u.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping", "the echo library answers");

    let next = cc(dir.path(), "tests/dylib/test_plugin.c", "next.so", &[]);
    std::fs::rename(&next, &lib).unwrap();
    let out = cli(&d, &["reload"]);
    assert!(out.status.success(), "{}", show(&out));
    // The new generation loaded the new file: the test plugin answers
    // "BANNER|SERVICE|PAYLOAD" (no banner option here).
    let reply = wait_for(DEADLINE, || {
        u.send_to(b"ping", udp).ok()?;
        let n = u.recv(&mut buf).ok()?;
        (buf[..n] == *b"|t|ping").then_some(())
    });
    assert!(
        reply.is_some(),
        "the reloaded workers still run the old library"
    );
    d.wait_log("test plugin initialised");
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no memory effects and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Issue 15 item 2: a library, or a directory above it (as named or behind
/// a symlink), owned by someone other than root or the master's user
/// (here: the workers' user, nobody) is refused by check and at boot.
#[test]
fn a_library_or_directory_owned_by_another_user_is_refused() {
    if !is_root() {
        eprintln!("skipped: chown to nobody needs root (CI runs the tests as root)");
        return;
    }
    let (_dir, lib) = test_plugin(&[]);
    std::os::unix::fs::chown(&lib, Some(65534), Some(65534)).unwrap();
    let config = dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "");
    let reason = format!("library {} is owned by uid 65534", lib.display());
    assert_check_fails(&config, &reason);
    assert_check_fails(&config, "run chown root:root");
    assert_boot_fails(&config, &reason);

    // Root's library in a directory that nobody owns.
    let top = libdir();
    let sub = top.path().join("theirs");
    std::fs::create_dir(&sub).unwrap();
    let lib = cc(&sub, "tests/dylib/test_plugin.c", "libtest.so", &[]);
    std::os::unix::fs::chown(&sub, Some(65534), Some(65534)).unwrap();
    let config = dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "");
    let reason = format!("directory {} is owned by uid 65534", sub.display());
    assert_check_fails(&config, &reason);
    assert_boot_fails(&config, &reason);

    // The same reached through a symlink in a good directory.
    let good = libdir();
    let link = good.path().join("libtest.so");
    std::os::unix::fs::symlink(&lib, &link).unwrap();
    let config = dylib_service(&["tcp://127.0.0.1:0"], "", &link, "");
    assert_check_fails(&config, &reason);
}

/// /tmp is world-writable (sticky): no exception, as in sshd.
#[test]
fn a_library_under_tmp_is_refused() {
    let dir = tempdir();
    let lib = cc(dir.path(), "tests/dylib/test_plugin.c", "libtest.so", &[]);
    let config = dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "");
    assert_check_fails(&config, "directory /tmp is writable by group or others");
}

/// Issue 15 item 2: `check` (root, as ExecStartPre) must not run the
/// library's code as root: its constructor runs as the workers' user, or
/// nobody without one.
#[test]
fn check_never_runs_library_code_as_root() {
    if !is_root() {
        eprintln!("skipped: the check-as-root test needs root (CI runs the tests as root)");
        return;
    }
    let markers = tempdir();
    std::fs::set_permissions(markers.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    for (daemon, uid) in [("[daemon]\nuser = \"nobody\"\n", "65534"), ("", "65534")] {
        let marker = markers.path().join(format!("marker{}", daemon.len()));
        let define = format!("-DCONSTRUCTOR_MARKER=\"{}\"", marker.display());
        let (_dir, lib) = test_plugin(&[define.as_str()]);
        let dir = tempdir();
        let path = dir.path().join("p.toml");
        let text = format!(
            "{daemon}{}",
            dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "")
        )
        .replace("{dir}", dir.path().to_str().unwrap());
        std::fs::write(&path, text).unwrap();
        let out = run_cli(&path, &["check"]);
        assert!(out.status.success(), "{}", show(&out));
        let ran = std::fs::read_to_string(&marker).unwrap_or_default();
        assert_eq!(
            ran.lines().collect::<Vec<_>>(),
            vec![uid],
            "the constructor ran as these uids ({daemon:?})"
        );
    }
    // A wrong ABI version is still found, by the child.
    let (_dir, lib) = test_plugin(&["-DTEST_ABI=99"]);
    let config = format!(
        "[daemon]\nuser = \"nobody\"\n{}",
        dylib_service(&["tcp://127.0.0.1:0"], "", &lib, "")
    );
    assert_check_fails(
        &config,
        "has ABI version 99, this preforkd speaks version 1",
    );
}
