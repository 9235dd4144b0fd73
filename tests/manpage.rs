//! packaging/preforkd.1 is what `cargo run --example gen-man` renders from
//! the current CLI definition: a changed flag or subcommand without a
//! regenerated man page fails here.

#[path = "../packaging/man.rs"]
mod man;

#[test]
fn committed_man_page_matches_the_cli() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/preforkd.1");
    let committed = std::fs::read(path).expect("packaging/preforkd.1");
    let rendered = man::render().expect("render");
    assert!(
        committed == rendered,
        "packaging/preforkd.1 is stale: run `cargo run --example gen-man`"
    );
}
