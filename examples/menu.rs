//! The menu dialogue of docs/MENU.md as a Rust handler: a binary with the
//! whole `preforkd` CLI plus one plugin, `menu`, in a few lines. It speaks
//! the socketserver tutorial's texts (the 10086 hotline) by default, and
//! English with `language = "en"` in `[service.handler.options]`.
//!
//! ```sh
//! cargo run --example menu -- -c config/examples/menu-rust.toml
//! nc 127.0.0.1 8011
//! ```

use std::io::{self, Write};

use preforkd::handler::{Connection, Handlers, PluginInfo, Recv, Registry, StreamHandler};

/// What the menu says (docs/MENU.md).
struct Texts {
    banner: &'static [u8],
    operator: &'static [u8],
    again: &'static [u8],
    /// Said before closing on `exit` (the tutorial just closes).
    goodbye: &'static [u8],
}

/// The tutorial's own texts.
const ZH: Texts = Texts {
    banner: "欢迎致电 10086,请输入1xxx,0转人工服务.\n".as_bytes(),
    operator: "通过可能会被录音.balabala一大推\n".as_bytes(),
    again: "请重新输入.\n".as_bytes(),
    goodbye: b"",
};

/// docs/MENU.md's English texts.
const EN: Texts = Texts {
    banner:
        b"Welcome to the preforkd menu. Please choose: 0 to talk to an operator, exit to leave.\n",
    operator: b"Your call is being transferred to an operator.\n",
    again: b"Invalid choice. Please choose again: 0 to talk to an operator, exit to leave.\n",
    goodbye: b"Goodbye.\n",
};

/// The most one read takes: a longer choice is answered in pieces
/// (docs/MENU.md, rule 4).
const MAX_READ: usize = 1024;

/// socketserver's `BaseRequestHandler` subclass, as a [`StreamHandler`].
struct Menu {
    texts: &'static Texts,
}

impl StreamHandler for Menu {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let t = self.texts;
        conn.write_all(t.banner)?;
        let mut buf = [0u8; MAX_READ];
        loop {
            let n = match conn.recv(&mut buf)? {
                Recv::Data(n) => n,
                Recv::Eof | Recv::Shutdown => return Ok(()),
            };
            for choice in choices(&buf[..n]) {
                match choice.trim_ascii() {
                    b"0" => conn.write_all(t.operator)?,
                    b"exit" => return conn.write_all(t.goodbye),
                    _ => conn.write_all(t.again)?,
                }
            }
        }
    }
}

/// The choices in what one read delivered: each line, and what follows
/// the last newline (the tutorial's client sends a choice with no newline
/// and waits for the answer).
fn choices(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let data = data.strip_suffix(b"\n").unwrap_or(data);
    data.split(|&b| b == b'\n')
}

fn main() {
    let mut registry = Registry::builtin();
    registry.register(PluginInfo::new(
        "menu",
        "the socketserver tutorial's menu dialogue (docs/MENU.md)",
        |ctx| {
            ctx.expect_options("menu", &["language"])?;
            let texts = match ctx.options.get("language").map(|v| v.as_str()) {
                None | Some(Some("zh")) => &ZH,
                Some(Some("en")) => &EN,
                Some(_) => {
                    return Err(
                        "plugin \"menu\": language must be \"zh\" (the tutorial's texts) or \"en\""
                            .into(),
                    );
                }
            };
            Ok(Handlers::stream(Menu { texts }))
        },
    ));
    preforkd::cli::main_with(registry)
}
