//! The docs hold together: every relative link in README.md and docs/*.md
//! (`[text](path)`, `[text](path#anchor)`, `[text](#anchor)`) names a file
//! or directory of the repository, and its anchor a heading of the target
//! (GitHub's slugs). And the tables that list what the code has are
//! complete: the metrics of src/metrics.rs and their causes, the source
//! map of docs/ARCHITECTURE.md, the keys of config/preforkd.toml in
//! docs/CONFIGURATION.md. Reads files; runs nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// README.md and every docs/*.md.
fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of a Markdown text outside fenced code blocks, with their
/// numbers (1-based).
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match fence {
            Some(f) if t.starts_with(f) => fence = None,
            Some(_) => {}
            None if t.starts_with("```") => fence = Some("```"),
            None if t.starts_with("~~~") => fence = Some("~~~"),
            None => out.push((i + 1, line)),
        }
    }
    out
}

/// A line without its inline code spans (`` `[a](b)` `` is not a link).
fn without_code(line: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// The targets of the inline links `[text](target)` of a line.
fn links(line: &str) -> Vec<String> {
    let line = without_code(line);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        // `[text](target "title")`: the target is the first word.
        let target = after[..end].split_whitespace().next().unwrap_or("");
        out.push(target.trim_matches(['<', '>']).to_string());
        rest = &after[end..];
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped except
/// `-` and `_`, spaces turned into `-`; links and emphasis count as their
/// text.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // [text](url) -> text
    while let Some(i) = rest.find('[') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        match (after.find("]("), after.find(')')) {
            (Some(close), Some(end)) if close < end => {
                text.push_str(&after[..close]);
                rest = &after[end + 1..];
            }
            _ => {
                text.push('[');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a Markdown file has: its headings' slugs, a repeated one
/// with GitHub's `-1`, `-2` suffixes.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, line) in prose(text) {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim().trim_end_matches('#').trim());
        let mut candidate = base.clone();
        let mut n = 0;
        while out.contains(&candidate) {
            n += 1;
            candidate = format!("{base}-{n}");
        }
        out.insert(candidate);
    }
    out
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(slug("Signals (to the master)"), "signals-to-the-master");
    assert_eq!(
        slug("`exec`: any program, inetd / tcpserver style"),
        "exec-any-program-inetd--tcpserver-style"
    );
    assert_eq!(
        slug("Access control: allow, deny, max_connections_per_ip"),
        "access-control-allow-deny-max_connections_per_ip"
    );
    assert_eq!(
        slug("`[service.handler]` and `[service.handler.options]`"),
        "servicehandler-and-servicehandleroptions"
    );
    assert_eq!(slug("See [the docs](x.md)"), "see-the-docs");
    let a = anchors("# A\n## B\n```\n## not a heading\n```\n## B\n");
    assert_eq!(a, ["a", "b", "b-1"].map(String::from).into());
    assert_eq!(
        links("[a](x.md) and `[b](y.md)` and [c](z.md#q \"t\")"),
        ["x.md", "z.md#q"]
    );
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in doc_files() {
        let text = read(&file);
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        for (n, line) in prose(&text) {
            for target in links(line) {
                if target.is_empty()
                    || target.contains("://")
                    || target.starts_with("mailto:")
                    || target.starts_with("//")
                {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let dest = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().unwrap().join(path)
                };
                if !dest.exists() {
                    broken.push(format!("{name}:{n}: {target}: no such file"));
                    continue;
                }
                // Links must stay inside the repository.
                let real = dest.canonicalize().unwrap();
                if !real.starts_with(root().canonicalize().unwrap()) {
                    broken.push(format!("{name}:{n}: {target}: outside the repository"));
                    continue;
                }
                if let Some(anchor) = anchor {
                    if dest.extension().is_none_or(|e| e != "md") {
                        broken.push(format!(
                            "{name}:{n}: {target}: an anchor into a non-Markdown file"
                        ));
                    } else if !anchors(&read(&dest)).contains(anchor) {
                        broken.push(format!(
                            "{name}:{n}: {target}: no heading with that anchor in {path}"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// What the docs must not point to: files a user with a clone does not
/// have. (docs/BENCHMARKS.md is someone else's to fix.)
#[test]
fn no_references_outside_the_clone() {
    let mut found = Vec::new();
    for file in doc_files() {
        if file.ends_with("docs/BENCHMARKS.md") {
            continue;
        }
        let text = read(&file);
        for (i, line) in text.lines().enumerate() {
            for bad in ["../shared/", "CONTEXT.md", "the issue"] {
                if line.contains(bad) {
                    found.push(format!("{}:{}: {bad}", file.display(), i + 1));
                }
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The `"label"`s of an enum's `label()` in src/stats.rs.
fn labels(stats: &str, enum_name: &str) -> Vec<String> {
    let arm = format!("{enum_name}::");
    stats
        .lines()
        .filter(|l| l.trim_start().starts_with(&arm) && l.contains("=> \""))
        .map(|l| l.split('"').nth(1).unwrap().to_string())
        .collect()
}

#[test]
fn metrics_table_lists_every_series_and_cause() {
    let ops = read(&root().join("docs/OPERATIONS.md"));
    let metrics = read(&root().join("src/metrics.rs"));
    let code = metrics.split("#[cfg(test)]").next().unwrap();
    let series: BTreeSet<&str> = code
        .split('"')
        .skip(1)
        .step_by(2)
        .filter_map(|s| {
            let name = s.split(['{', ' ']).next().unwrap();
            (name.starts_with("preforkd_") && name.len() > "preforkd_".len()).then_some(name)
        })
        .collect();
    assert!(
        series.len() >= 15,
        "found only {series:?} in src/metrics.rs"
    );
    let row = |name: &str| {
        ops.lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .map(str::to_string)
    };
    let missing: Vec<_> = series.iter().filter(|s| row(s).is_none()).collect();
    assert!(
        missing.is_empty(),
        "docs/OPERATIONS.md's metrics table lacks {missing:?}"
    );
    let stats = read(&root().join("src/stats.rs"));
    for (metric, enum_name) in [
        ("preforkd_worker_exits_total", "ExitCause"),
        ("preforkd_worker_spawns_total", "SpawnCause"),
    ] {
        let causes = labels(&stats, enum_name);
        assert!(causes.len() >= 4, "{enum_name}: {causes:?}");
        let row = row(metric).unwrap();
        let listed = row
            .split("cause = ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap_or_else(|| panic!("no `cause = a/b/...` in the row of {metric}"));
        let listed: Vec<&str> = listed.split('/').collect();
        assert_eq!(
            listed, causes,
            "{metric}: the causes of {enum_name}, in order"
        );
    }
}

/// Every `.rs` file under `dir`, relative to the repository.
fn sources(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root()).unwrap();
            out.push(rel.display().to_string());
        }
    }
}

#[test]
fn source_map_names_every_file() {
    let arch = read(&root().join("docs/ARCHITECTURE.md"));
    let mut files = Vec::new();
    sources(&root().join("src"), &mut files);
    files.sort();
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !arch.contains(&format!("| `{f}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md's source map lacks {missing:?}"
    );
}

#[test]
fn configuration_reference_names_every_key() {
    let reference = read(&root().join("config/preforkd.toml"));
    let doc = read(&root().join("docs/CONFIGURATION.md"));
    let mut missing = Vec::new();
    let mut keys = 0;
    for line in reference.lines() {
        // `key = value` and `#key = value` (a key shown commented out);
        // not the comments' prose, which has a space after the `#`.
        let line = line.strip_prefix('#').unwrap_or(line);
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        keys += 1;
        if !doc.contains(&format!("| `{key}` |")) {
            missing.push(key.to_string());
        }
    }
    assert!(keys >= 30, "found only {keys} keys in config/preforkd.toml");
    assert!(
        missing.is_empty(),
        "docs/CONFIGURATION.md has no row for {missing:?}"
    );
}
