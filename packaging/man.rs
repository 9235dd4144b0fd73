//! The man pages. preforkd.1 is rendered from the clap definition;
//! preforkd.toml.5 from config/preforkd.toml, the annotated reference
//! configuration (its tables, keys and comments). Shared by
//! examples/gen-man.rs (writes packaging/preforkd.1 and
//! packaging/preforkd.toml.5) and tests/manpage.rs (checks that the
//! committed pages match the CLI and the reference config).

use clap::CommandFactory;

/// preforkd.1: NAME, SYNOPSIS, DESCRIPTION and OPTIONS from the CLI, the
/// COMMANDS with their arguments, then the files, signals, exit status and
/// related pages the CLI cannot know.
pub fn render() -> std::io::Result<Vec<u8>> {
    let cmd = preforkd::cli::Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    render_commands(&cmd, &mut out);
    out.extend_from_slice(EXTRA.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// Escapes text for roff: backslashes, hyphens (so that they are not
/// broken or turned into dashes), and a leading `.` or `'`.
fn esc(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// COMMANDS: each subcommand as it is typed (`preforkd [-c FILE] status
/// [--json]`), what it does, and its arguments. (clap_mangen's own section
/// names a page per subcommand, `preforkd-status(1)`, which does not
/// exist.)
fn render_commands(cmd: &clap::Command, out: &mut Vec<u8>) {
    out.extend_from_slice(b".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let args: Vec<_> = sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set() && a.get_id() != "help")
            .collect();
        let mut usage = format!(
            "\\fBpreforkd\\fR [\\fB\\-c\\fR \\fIFILE\\fR] \\fB{}\\fR",
            esc(sub.get_name())
        );
        let mut items = Vec::new();
        for a in &args {
            let value = a
                .get_value_names()
                .filter(|_| a.get_action().takes_values());
            let (short, name) = match (a.get_long(), value) {
                (Some(l), Some(v)) => {
                    let v = esc(v[0].as_str());
                    (
                        format!("[\\fB\\-\\-{}\\fR \\fI{v}\\fR]", esc(l)),
                        format!("\\fB\\-\\-{}\\fR \\fI{v}\\fR", esc(l)),
                    )
                }
                (Some(l), None) => {
                    let l = esc(l);
                    (format!("[\\fB\\-\\-{l}\\fR]"), format!("\\fB\\-\\-{l}\\fR"))
                }
                (None, Some(v)) => {
                    let v = format!("\\fI{}\\fR", esc(v[0].as_str()));
                    (v.clone(), v)
                }
                (None, None) => {
                    let v = format!("\\fI{}\\fR", esc(&a.get_id().as_str().to_uppercase()));
                    (v.clone(), v)
                }
            };
            usage.push(' ');
            usage.push_str(&short);
            let mut help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if let Some(d) = a
                .get_default_values()
                .first()
                .filter(|_| a.get_action().takes_values())
            {
                help.push_str(&format!(" [default: {}]", d.to_string_lossy()));
            }
            items.push(format!(".TP\n{name}\n{}\n", esc(&help)));
        }
        let about = sub.get_about().map(|h| h.to_string()).unwrap_or_default();
        out.extend_from_slice(format!(".TP\n{usage}\n{}\n", esc(&about)).as_bytes());
        if !items.is_empty() {
            out.extend_from_slice(b".RS\n");
            for item in items {
                out.extend_from_slice(item.as_bytes());
            }
            out.extend_from_slice(b".RE\n");
        }
    }
}

const EXTRA: &str = r#".SH FILES
.TP
\fI/etc/preforkd/preforkd.toml\fR
The configuration read by preforkd.service.
.TP
\fI/usr/share/doc/preforkd/reference.toml\fR
Every configuration key, with its default and meaning; the same as
\fBpreforkd.toml\fR(5).
.TP
\fI/usr/share/doc/preforkd/README.md\fR, \fI/usr/share/doc/preforkd/docs/\fR
The documentation: a first service, operations, plugins, architecture.
.TP
\fI/run/preforkd/control.sock\fR, \fI/run/preforkd/preforkd.pid\fR
The control socket and pid file of the packaged configuration.
.SH SIGNALS
SIGTERM: graceful stop. SIGINT, SIGQUIT: fast stop. SIGHUP: reload.
SIGUSR2: binary upgrade. SIGUSR1: reopen log files. SIGTTIN, SIGTTOU: one
worker more or fewer in every service.
.SH EXIT STATUS
0 success; 1 a control command failed; 64 bad command line; 69 an address
could not be bound; 70 internal error; 73 the pid file or log file could
not be created; 78 invalid configuration, or the first workers could not
initialise their handler.
.SH "SEE ALSO"
\fBpreforkd.toml\fR(5), \fBsystemctl\fR(1), \fBsystemd.service\fR(5),
\fBsystemd.socket\fR(5), \fBsd_notify\fR(3), \fBlogrotate\fR(8)
"#;

/// The annotated reference configuration the 5 page is made from.
pub const REFERENCE: &str = include_str!("../config/preforkd.toml");

/// One piece of the reference config: comment text, or keys with the
/// comment just above them.
enum Item {
    /// A comment that stands alone (a blank line follows it).
    Text(Vec<String>),
    /// `key = value` lines (`commented` for `#key = value`: an example,
    /// not set by default), with their comment.
    Keys(Vec<String>, Vec<(String, String, bool)>),
}

/// `key = value` or `#key = value`: the key, the value, and whether it is
/// commented out. Comment prose has a space after the `#`, keys do not.
fn key_line(line: &str) -> Option<(String, String, bool)> {
    let (body, commented) = match line.strip_prefix('#') {
        Some(rest) => (rest, true),
        None => (line, false),
    };
    let (key, value) = body.split_once(" = ")?;
    let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    is_key.then(|| (key.to_string(), value.trim().to_string(), commented))
}

/// The reference config in order: the text before the first table, then
/// each table (`[daemon]`, `[[service]]`, ...) with its items.
fn parse_reference(text: &str) -> (Vec<Item>, Vec<(String, Vec<Item>)>) {
    let mut preamble = Vec::new();
    let mut tables: Vec<(String, Vec<Item>)> = Vec::new();
    let mut comment: Vec<String> = Vec::new();
    for line in text.lines() {
        let items = match tables.last_mut() {
            Some((_, items)) => items,
            None => &mut preamble,
        };
        let line = line.trim_end();
        if line.is_empty() {
            if !comment.is_empty() {
                items.push(Item::Text(std::mem::take(&mut comment)));
            }
        } else if line.starts_with('[') {
            let name = line.to_string();
            let mut items = Vec::new();
            if !comment.is_empty() {
                items.push(Item::Text(std::mem::take(&mut comment)));
            }
            tables.push((name, items));
        } else if let Some(key) = key_line(line) {
            match items.last_mut() {
                Some(Item::Keys(_, keys)) if comment.is_empty() => keys.push(key),
                _ => items.push(Item::Keys(std::mem::take(&mut comment), vec![key])),
            }
        } else if let Some(text) = line.strip_prefix('#') {
            comment.push(text.strip_prefix(' ').unwrap_or(text).to_string());
        } else {
            panic!("config/preforkd.toml: a line the man page does not know: {line:?}");
        }
    }
    if !comment.is_empty() {
        let items = match tables.last_mut() {
            Some((_, items)) => items,
            None => &mut preamble,
        };
        items.push(Item::Text(comment));
    }
    (preamble, tables)
}

/// Comment lines as roff: prose filled, an empty line a paragraph break,
/// lines that start with spaces (the lists of values) kept as they are.
fn render_comment(lines: &[String], out: &mut String) {
    let mut verbatim = false;
    for line in lines {
        let indented = line.starts_with("  ");
        if indented != verbatim {
            out.push_str(if indented { ".nf\n" } else { ".fi\n" });
            verbatim = indented;
        }
        if line.is_empty() {
            out.push_str(".sp\n");
        } else {
            out.push_str(&esc(line));
            out.push('\n');
        }
    }
    if verbatim {
        out.push_str(".fi\n");
    }
}

/// preforkd.toml.5, from the annotated reference configuration: NAME,
/// SYNOPSIS, DESCRIPTION (the file's opening comments), a section per
/// table with each key, its default (or an example) and its comment, then
/// FILES and SEE ALSO.
pub fn render_config() -> Vec<u8> {
    let (preamble, tables) = parse_reference(REFERENCE);
    let version = env!("CARGO_PKG_VERSION");
    let mut out = format!(
        ".TH preforkd.toml 5 \"\" \"preforkd {version}\"\n\
         .SH NAME\n\
         preforkd.toml \\- configuration file of preforkd(1)\n\
         .SH SYNOPSIS\n\
         \\fI/etc/preforkd/preforkd.toml\\fR (the packaged service's), or any\n\
         file named with \\fBpreforkd \\-c\\fR \\fIFILE\\fR\n\
         .SH DESCRIPTION\n\
         A TOML file: the tables \\fB[daemon]\\fR, \\fB[control]\\fR, \\fB[metrics]\\fR,\n\
         \\fB[log]\\fR, and one \\fB[[service]]\\fR per pool of workers, each with its\n\
         \\fB[service.handler]\\fR. Only \\fB[[service]]\\fR is required. This page is\n\
         made from the annotated reference configuration\n\
         (\\fI/usr/share/doc/preforkd/reference.toml\\fR): each key is shown with its\n\
         default; a key marked (example) is not set by default.\n\
         Relative paths are resolved from the directory preforkd is started in\n\
         (\\fB\\-\\-daemon\\fR: from /).\n\
         .PP\n"
    );
    for item in &preamble {
        if let Item::Text(lines) = item {
            // The file's own title line says what this page's NAME says.
            let lines: Vec<String> = lines
                .iter()
                .filter(|l| !l.starts_with("preforkd reference configuration"))
                .cloned()
                .collect();
            render_comment(&lines, &mut out);
            out.push_str(".PP\n");
        }
    }
    for (name, items) in &tables {
        out.push_str(&format!(".SH \"{}\"\n", esc(name)));
        for item in items {
            match item {
                Item::Text(lines) => {
                    out.push_str(".PP\n");
                    render_comment(lines, &mut out);
                }
                Item::Keys(comment, keys) => {
                    out.push_str(".PP\n");
                    for (i, (key, value, commented)) in keys.iter().enumerate() {
                        if i > 0 {
                            out.push_str(".br\n");
                        }
                        let note = if *commented { " (example)" } else { "" };
                        out.push_str(&format!("\\fB{}\\fR = {}{note}\n", esc(key), esc(value)));
                    }
                    if !comment.is_empty() {
                        out.push_str(".RS\n");
                        render_comment(comment, &mut out);
                        out.push_str(".RE\n");
                    }
                }
            }
        }
    }
    out.push_str(CONFIG_EXTRA);
    out.into_bytes()
}

const CONFIG_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/preforkd/preforkd.toml\fR
The configuration of the packaged service (a conffile).
.TP
\fI/usr/share/doc/preforkd/reference.toml\fR
The annotated reference configuration this page is made from.
.TP
\fI/usr/share/doc/preforkd/docs/CONFIGURATION.md\fR
The same keys as tables, with links to what each does.
.SH "SEE ALSO"
\fBpreforkd\fR(1); \fBpreforkd check \-c\fR \fIFILE\fR validates a file, \fBpreforkd
print\-config \-c\fR \fIFILE\fR shows it with the defaults filled in.
"#;
