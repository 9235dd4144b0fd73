//! The shape of src/, checked: no import cycle among its modules, `config`
//! and `sys` leaves, no file too long to have one job, and lib.rs's
//! `# Layout` naming every module. Reads the sources; runs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A file's code without its unit tests and comments (doc links name
/// modules without importing them).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules each top-level module uses (`crate::NAME`).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in sources(&src) {
        let rel = path.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&path).unwrap());
        let deps = graph.entry(top.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = graph();
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for d in graph.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let cycles: Vec<String> = graph
        .iter()
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m, d)))
        .filter(|(m, d)| reach(d).contains(*m))
        .map(|(m, d)| format!("{m} -> {d}"))
        .collect();
    assert!(cycles.is_empty(), "import cycles through: {cycles:?}");
}

#[test]
fn config_and_sys_are_leaves() {
    let graph = graph();
    let config = &graph["config"];
    for upper in ["handler", "master", "worker", "log", "sys", "resolve"] {
        assert!(
            !config.contains(upper),
            "config imports {upper}: {config:?}"
        );
    }
    assert!(graph["sys"].is_empty(), "sys imports {:?}", graph["sys"]);
}

#[test]
fn no_file_is_too_long_for_one_job() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for path in sources(&src) {
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests at a file's end are not part of its job.
        let lines = code(&text).lines().count();
        let name = path.strip_prefix(&src).unwrap().display().to_string();
        // config.rs is a schema: long by nature.
        let limit = match name.as_str() {
            "config.rs" => usize::MAX,
            "master/mod.rs" => 800,
            _ => 900,
        };
        assert!(
            lines <= limit,
            "{name}: {lines} lines of code, more than {limit}"
        );
    }
}

#[test]
fn the_layout_doc_names_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let layout = &lib[lib.find("# Layout").expect("lib.rs has a # Layout")..];
    for m in lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
    {
        assert!(
            layout.contains(&format!("[`{m}`]")),
            "lib.rs # Layout does not list {m}"
        );
    }
}
