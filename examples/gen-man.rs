//! Writes the man pages: packaging/preforkd.1, generated from the CLI
//! definition (`preforkd::cli::Cli`), and packaging/preforkd.toml.5, from the
//! annotated reference configuration config/preforkd.toml:
//! `cargo run --example gen-man [OUT1 [OUT5]]`, the paths defaulting to
//! those two. tests/manpage.rs fails when a committed page is stale.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let packaging = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging");
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let page1 = args.next().unwrap_or_else(|| packaging.join("preforkd.1"));
    let page5 = args
        .next()
        .unwrap_or_else(|| packaging.join("preforkd.toml.5"));
    std::fs::write(&page1, preforkd_man::render()?)?;
    eprintln!("wrote {}", page1.display());
    std::fs::write(&page5, preforkd_man::render_config())?;
    eprintln!("wrote {}", page5.display());
    Ok(())
}

#[path = "../packaging/man.rs"]
mod preforkd_man;
