//! The menu dialogue of docs/MENU.md as a Rust handler: a binary with the
//! whole `preforkd` CLI plus one plugin, `menu`, in a few lines.
//!
//! ```sh
//! cargo run --example menu -- -c config/examples/menu-rust.toml
//! nc 127.0.0.1 8011
//! ```

use std::io::{self, Write};

use preforkd::handler::{Connection, Handlers, PluginInfo, Recv, Registry, StreamHandler};

const BANNER: &[u8] =
    b"Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.\n";
const OPERATOR: &[u8] = b"Your call is being transferred to an operator.\n";
const GOODBYE: &[u8] = b"Goodbye.\n";
const AGAIN: &[u8] =
    b"Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.\n";
/// The longest choice read as one line (docs/MENU.md, rule 4).
const MAX_LINE: usize = 1024;

/// socketserver's `BaseRequestHandler` subclass, as a [`StreamHandler`].
struct Menu;

impl StreamHandler for Menu {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        conn.write_all(BANNER)?;
        let mut line = Vec::with_capacity(MAX_LINE);
        loop {
            line.clear();
            match conn.recv_line(&mut line, MAX_LINE)? {
                Recv::Data(_) => match line.trim_ascii() {
                    b"0" => conn.write_all(OPERATOR)?,
                    b"exit" => return conn.write_all(GOODBYE),
                    _ => conn.write_all(AGAIN)?,
                },
                Recv::Eof | Recv::Shutdown => return Ok(()),
            }
        }
    }
}

fn main() {
    let mut registry = Registry::builtin();
    registry.register(PluginInfo::new(
        "menu",
        "the socketserver tutorial's menu dialogue (docs/MENU.md)",
        |ctx| {
            ctx.expect_options("menu", &[])?;
            Ok(Handlers::stream(Menu))
        },
    ));
    preforkd::cli::main_with(registry)
}
