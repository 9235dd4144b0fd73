//! Writes the man page generated from the CLI definition (`preforkd::cli::Cli`):
//! `cargo run --example gen-man [OUT]`, OUT defaulting to packaging/preforkd.1.
//! tests/manpage.rs fails when the committed page no longer matches the CLI.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/preforkd.1"));
    std::fs::write(&out, preforkd_man::render()?)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[path = "../packaging/man.rs"]
mod preforkd_man;
