//! The man page, rendered from the clap definition. Shared by
//! examples/gen-man.rs (writes packaging/preforkd.1) and tests/manpage.rs
//! (checks that the committed page matches the CLI).

use clap::CommandFactory;

/// preforkd.1: NAME, SYNOPSIS, DESCRIPTION, OPTIONS and SUBCOMMANDS from
/// the CLI, then the files, signals and exit status the CLI cannot know.
pub fn render() -> std::io::Result<Vec<u8>> {
    let cmd = preforkd::cli::Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    man.render_subcommands_section(&mut out)?;
    render_subcommand_arguments(&cmd, &mut out);
    out.extend_from_slice(EXTRA.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// The arguments of each subcommand (`status --json`, `reload --timeout`,
/// `scale SERVICE N`), which the SUBCOMMANDS section does not show.
fn render_subcommand_arguments(cmd: &clap::Command, out: &mut Vec<u8>) {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('-', "\\-");
    out.extend_from_slice(b".SH \"SUBCOMMAND ARGUMENTS\"\n");
    for sub in cmd.get_subcommands() {
        let args: Vec<_> = sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set() && a.get_id() != "help")
            .collect();
        if args.is_empty() {
            continue;
        }
        out.extend_from_slice(format!(".SS {}\n", sub.get_name()).as_bytes());
        for a in args {
            let value = a
                .get_value_names()
                .filter(|_| a.get_action().takes_values());
            let name = match (a.get_long(), value) {
                (Some(l), Some(v)) => {
                    format!("\\fB\\-\\-{}\\fR \\fI<{}>\\fR", esc(l), esc(v[0].as_str()))
                }
                (Some(l), None) => format!("\\fB\\-\\-{}\\fR", esc(l)),
                (None, Some(v)) => format!("\\fI<{}>\\fR", esc(v[0].as_str())),
                (None, None) => format!("\\fI<{}>\\fR", esc(&a.get_id().as_str().to_uppercase())),
            };
            let mut help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if let Some(d) = a
                .get_default_values()
                .first()
                .filter(|_| a.get_action().takes_values())
            {
                help.push_str(&format!(" [default: {}]", d.to_string_lossy()));
            }
            out.extend_from_slice(format!(".TP\n{name}\n{}\n", esc(&help)).as_bytes());
        }
    }
}

const EXTRA: &str = r#".SH FILES
.TP
\fI/etc/preforkd/preforkd.toml\fR
The configuration read by preforkd.service.
.TP
\fI/usr/share/doc/preforkd/reference.toml\fR
Every configuration key, with its default and meaning.
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
"#;
