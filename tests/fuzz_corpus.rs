//! The fuzz targets' properties (fuzz/fuzz_targets/), checked in every
//! `cargo test`: on the regression corpus checked in under
//! tests/fuzz-corpus/ (seeds, and any input a fuzz run found), and on
//! bounded random mutations of valid configs (proptest): the parsers never
//! panic, every config error starts with `file:line:col:`, and a control
//! request that parses goes back on the wire as itself.
//!
//! Pure: nothing forks, nothing is bound.

use std::path::{Path, PathBuf};

use preforkd::config::{Config, Source};
use preforkd::control::Request;
use preforkd::metrics::{head_complete, parse_request};
use proptest::prelude::*;

fn corpus(dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Whether `msg` starts with `fuzz.toml:LINE:COL: `.
fn positioned(msg: &str) -> bool {
    let Some(rest) = msg.strip_prefix("fuzz.toml:") else {
        return false;
    };
    let mut parts = rest.splitn(3, ':');
    let num =
        |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    num(parts.next()) && num(parts.next()) && parts.next().is_some_and(|r| r.starts_with(' '))
}

/// The config target's property; Err says what broke.
fn check_config(text: &str) -> Result<(), String> {
    match Config::parse(text, Source::File("fuzz.toml".into())) {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            if positioned(&msg) {
                Ok(())
            } else {
                Err(format!("an error without file:line:col: {msg:?}"))
            }
        }
    }
}

fn check_control(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    if let Ok(r) = Request::parse(&line) {
        assert_eq!(Request::parse(&r.to_line()), Ok(r));
    }
}

fn check_metrics(data: &[u8]) {
    match parse_request(data, head_complete(data)) {
        Ok((method, target)) => assert!(!method.is_empty() && target.starts_with('/')),
        Err(status) => assert!(matches!(status, 400 | 431), "status {status}"),
    }
}

#[test]
fn the_config_corpus_replays() {
    for (path, data) in corpus("config") {
        // The parser takes text; invalid UTF-8 is refused before it.
        if let Ok(text) = std::str::from_utf8(&data) {
            check_config(text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

#[test]
fn the_control_corpus_replays() {
    for (_, data) in corpus("control") {
        check_control(&data);
    }
}

#[test]
fn the_metrics_corpus_replays() {
    for (_, data) in corpus("metrics") {
        check_metrics(&data);
    }
}

/// A valid config to mutate.
const BASE: &str = "[daemon]\nuser = \"nobody\"\n\n[log]\nlevel = \"info\"\n\n[[service]]\nname = \"echo\"\nlisten = [\"tcp://127.0.0.1:0\", \"unix:/tmp/x.sock\"]\nplugin = \"echo\"\nworkers = 2\nthreads = 2\nidle_timeout = \"5s\"\n";

/// One mutation of `text`: a byte range replaced by a few characters that
/// matter to TOML, or cut, or duplicated.
fn mutate(text: &str, at: usize, len: usize, with: &str, kind: u8) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = at % (chars.len() + 1);
    let end = (at + len).min(chars.len());
    let (head, tail) = (&chars[..at], &chars[end..]);
    let mid: String = match kind % 3 {
        0 => with.to_string(),
        1 => String::new(),
        _ => chars[at..end].iter().collect::<String>().repeat(2),
    };
    head.iter().collect::<String>() + &mid + &tail.iter().collect::<String>()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutated configs: never a panic, every error positioned.
    #[test]
    fn mutated_configs_never_panic_and_errors_have_a_position(
        muts in proptest::collection::vec(
            (0usize..400, 0usize..12, "[\\[\\]=\"'\\n#,.{}a-z0-9 \\\\:-]{0,6}", any::<u8>()),
            1..4,
        )
    ) {
        let mut text = BASE.to_string();
        for (at, len, with, kind) in &muts {
            text = mutate(&text, *at, *len, with, *kind);
        }
        if let Err(e) = check_config(&text) {
            return Err(TestCaseError::fail(format!("{e}\n--- config:\n{text}")));
        }
    }

    /// Arbitrary request lines and heads.
    #[test]
    fn control_and_metrics_parsers_take_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_control(&data);
        check_metrics(&data);
    }
}
