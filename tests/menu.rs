//! The Rust implementation of the menu dialogue (examples/menu.rs, built by
//! `cargo test` like every example) over TCP and a Unix socket, from the
//! shipped config/examples/menu-rust.toml with its addresses made private.

mod common;

use std::io::Write;
use std::path::PathBuf;

use common::*;

/// target/debug/examples/menu, next to this test's deps/ directory.
fn menu_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/menu");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test` (which builds the examples) or `cargo build --example menu`",
        bin.display()
    );
    bin
}

/// The shipped example config, on port 0 and a socket in the test's dir.
fn config() -> String {
    let shipped = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/examples/menu-rust.toml"),
    )
    .unwrap();
    let replaced = shipped
        .replace("tcp://127.0.0.1:8011", "tcp://127.0.0.1:0")
        .replace("unix:/tmp/preforkd-menu-rust.sock", "unix:{dir}/menu.sock");
    assert_ne!(shipped, replaced, "the example's addresses changed");
    // The handler's table is the file's last: English for menu_dialogue.
    format!("{replaced}\n[service.handler.options]\nlanguage = \"en\"\n")
}

#[test]
fn the_dialogue_over_tcp_and_unix() {
    let d = Daemon::start_bin(&menu_bin(), &config(), &[]);
    d.wait_ready();
    menu_dialogue(connect(d.addr("tcp", "menu")).unwrap());
    menu_dialogue(connect_unix(&d.path("menu.sock")).unwrap());
}

#[test]
fn the_tutorials_client_is_answered_in_its_own_texts() {
    let shipped = config();
    let config = shipped.split("\n[service.handler.options]").next().unwrap();
    let d = Daemon::start_bin(&menu_bin(), config, &[]);
    d.wait_ready();
    tutorial_client(connect(d.addr("tcp", "menu")).unwrap());
    tutorial_client(connect_unix(&d.path("menu.sock")).unwrap());
}

#[test]
fn long_lines_and_silent_close() {
    let d = Daemon::start_bin(&menu_bin(), &config(), &[]);
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "menu")).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_BANNER);
    // 3000 bytes and a newline: invalid, in at most 1 KiB pieces.
    s.write_all(&[b'x'; 3000]).unwrap();
    s.write_all(b"\n0\n").unwrap();
    let mut again = 0;
    loop {
        let line = read_line(&mut s).unwrap();
        if line == MENU_OPERATOR {
            break;
        }
        assert_eq!(line, MENU_AGAIN);
        again += 1;
    }
    // Three reads of at most 1 KiB, and the newline may come alone.
    assert!((1..=4).contains(&again), "{again} answers to a long line");
    // The client closes: the server closes without a word.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s).unwrap(), b"");
}

#[test]
fn a_stop_closes_a_waiting_caller_at_the_menu() {
    let mut d = Daemon::start_bin(&menu_bin(), &config(), &[]);
    d.wait_ready();
    let mut s = connect(d.addr("tcp", "menu")).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_BANNER);
    s.write_all(b"0\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), MENU_OPERATOR);
    // Waiting for a choice is a request boundary: the stop closes it.
    d.signal(libc::SIGTERM);
    assert_eq!(read_to_eof(&mut s).unwrap(), b"", "clean EOF, no RST");
    assert!(d.wait_exit(DEADLINE).success());
    assert!(!d.log_text().contains("SIGKILL"), "{}", d.log_text());
}

#[test]
fn listed_and_checked() {
    let out = std::process::Command::new(menu_bin())
        .arg("plugins")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success());
    for name in ["menu", "echo", "chargen"] {
        assert!(text.lines().any(|l| l.starts_with(name)), "{text}");
    }
    let dir = tempdir();
    let path = dir.path().join("menu.toml");
    std::fs::write(
        &path,
        config().replace("{dir}", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new(menu_bin())
        .arg("-c")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    // The plain binary has no `menu` plugin: 78, with the line of it.
    let out = std::process::Command::new(bin())
        .arg("-c")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", show(&out));
    assert!(
        stderr(&out).contains("menu.toml:17:10: unknown plugin \"menu\""),
        "{}",
        show(&out)
    );
}
