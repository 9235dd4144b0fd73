//! The command line: `preforkd [-c FILE] [run|check|print-config]`.
//!
//! [`main`] is the whole binary; [`main_with`] is the same CLI with a
//! registry of your own plugins, for binaries that embed preforkd.
//! Errors are mapped to exit codes here and nowhere else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};
use crate::exit::code;
use crate::handler::Registry;
use crate::master::Master;
use crate::sys;

/// preforkd: a pre-fork daemon for any socket service.
#[derive(Debug, Parser)]
#[command(name = "preforkd", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML). Without it, the embedded default: echo on
    /// tcp://127.0.0.1:8009 with 2 workers.
    #[arg(short, long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run in the foreground (the default).
    Run,
    /// Validate the config and print a summary (exit 0, or 78 if invalid).
    Check,
    /// Print the effective config, defaults filled in.
    PrintConfig,
}

/// Runs the `preforkd` binary with the built-in plugins; never returns.
pub fn main() -> ! {
    main_with(Registry::builtin())
}

/// Runs the `preforkd` CLI with `registry`'s plugins; never returns.
pub fn main_with(registry: Registry) -> ! {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                code::USAGE
            } else {
                code::OK
            });
        }
    };
    std::process::exit(run(cli, &registry))
}

fn load(cli: &Cli, registry: &Registry) -> Result<Config, ConfigError> {
    match &cli.config {
        Some(path) => Config::load(path, registry),
        None => Config::embedded(registry),
    }
}

/// Executes a parsed command line; returns the exit code.
pub fn run(cli: Cli, registry: &Registry) -> i32 {
    crate::log::init(log::LevelFilter::Info);
    match cli.command.as_ref().unwrap_or(&Command::Run) {
        Command::Check => match load(&cli, registry) {
            Ok(config) => {
                println!("{}: configuration is valid", config.source);
                for s in &config.services {
                    let listen: Vec<String> = s.addrs.iter().map(ToString::to_string).collect();
                    println!(
                        "  service {}: plugin {}, {} workers x {} threads, listen {}",
                        s.name.get_ref(),
                        s.handler.plugin.get_ref(),
                        s.workers.resolve(),
                        s.threads,
                        listen.join(", ")
                    );
                }
                code::OK
            }
            Err(e) => config_error(&e),
        },
        Command::PrintConfig => match load(&cli, registry) {
            Ok(config) => {
                print!("{}", config.to_toml());
                code::OK
            }
            Err(e) => config_error(&e),
        },
        Command::Run => {
            let config = match load(&cli, registry) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            crate::log::init(config.log.level.filter());
            if cli.config.is_none() {
                log::info!(
                    "no --config given: serving the embedded default (echo on tcp://127.0.0.1:8009, 2 workers)"
                );
            } else {
                log::info!("configuration {}", config.source);
            }
            if let Err(e) = sys::init_title() {
                log::debug!("process titles unavailable: {e}");
            }
            let result = Master::new(&config, registry).and_then(Master::run);
            match result {
                Ok(c) => c,
                Err(e) => {
                    log::error!("{e}");
                    e.exit_code()
                }
            }
        }
    }
}

fn config_error(e: &ConfigError) -> i32 {
    eprintln!("preforkd: {e}");
    code::CONFIG
}
