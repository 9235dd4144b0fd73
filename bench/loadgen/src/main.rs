//! loadgen: preforkd's load generator. Drives an echo service over TCP, a
//! Unix stream socket or UDP in a closed loop (rr, connect, udp modes),
//! holds many idle connections (hold mode) or waits until it serves (wait
//! mode), and reports rate, latency and errors as text or JSON. Two
//! engines: event loops (epoll, the default for streams) or a thread per
//! connection. Loopback and Unix sockets only; every run ends by itself,
//! even against a server that hangs. See bench/README.md.

mod cli;
mod event;
mod hist;
mod limit;
mod load;
mod payload;
mod probe;
mod report;

use cli::{Engine, Mode};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match cli::parse(std::env::args().skip(1)) {
        Ok(Some(c)) => c,
        Ok(None) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.mode == Mode::Wait {
        return match probe::wait(&cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadgen wait: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Up to the hard limit, as nginx's worker_rlimit_nofile does: -c 10000
    // should not need a ulimit by hand.
    if let Err(e) = limit::fit(&cfg) {
        eprintln!("loadgen: {e}");
        return ExitCode::from(2);
    }
    let run = match cfg.engine {
        Engine::Epoll => event::run(cfg.clone()),
        Engine::Threads => load::run(cfg.clone()),
    };
    let r = match run {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(3);
        }
    };
    let (text, json) = report::render(&cfg, &r);
    if cfg.json {
        eprint!("{text}");
        println!("{json}");
    } else {
        print!("{text}");
    }
    let unserved = r.hold.as_ref().is_some_and(|h| h.served < cfg.connections);
    if cfg.fail_on_error && (r.counts.errors.total() > 0 || unserved) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
