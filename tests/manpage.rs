//! The committed man pages are what `cargo run --example gen-man` renders:
//! packaging/preforkd.1 from the current CLI definition (a changed flag or
//! subcommand without a regenerated page fails here), and
//! packaging/preforkd.toml.5 from config/preforkd.toml (a changed key or
//! comment likewise).

#[path = "../packaging/man.rs"]
mod man;

fn committed(name: &str) -> Vec<u8> {
    let path = format!("{}/packaging/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn committed_man_page_matches_the_cli() {
    let rendered = man::render().expect("render");
    assert!(
        committed("preforkd.1") == rendered,
        "packaging/preforkd.1 is stale: run `cargo run --example gen-man`"
    );
}

#[test]
fn committed_config_page_matches_the_reference() {
    assert!(
        committed("preforkd.toml.5") == man::render_config(),
        "packaging/preforkd.toml.5 is stale: run `cargo run --example gen-man`"
    );
}

/// The pages name each other, and no page that does not exist (clap_mangen
/// names one per subcommand, `preforkd-run(1)`; there is none).
#[test]
fn pages_refer_to_real_pages() {
    let page1 = String::from_utf8(man::render().unwrap()).unwrap();
    let page5 = String::from_utf8(man::render_config()).unwrap();
    assert!(
        page1.contains("\\fBpreforkd.toml\\fR(5)"),
        "preforkd.1 names preforkd.toml(5)"
    );
    assert!(
        page5.contains("\\fBpreforkd\\fR(1)"),
        "preforkd.toml.5 names preforkd(1)"
    );
    assert!(
        !page1.contains("preforkd\\-"),
        "preforkd.1 names a preforkd-SUBCOMMAND page"
    );
    // Every key of the reference config has its line in the 5 page.
    for line in man::REFERENCE.lines() {
        let line = line.strip_prefix('#').unwrap_or(line);
        if let Some((key, _)) = line.split_once(" = ")
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            let key = key.replace('-', "\\-");
            assert!(
                page5.contains(&format!("\\fB{key}\\fR = ")),
                "preforkd.toml.5 lacks {key}"
            );
        }
    }
}
