//! loadgen: preforkd's load generator. Drives an echo service over TCP, a
//! Unix stream socket or UDP in a closed loop (rr, connect, udp modes) or
//! waits until it serves (wait mode), and reports rate, latency and errors
//! as text or JSON. Loopback and Unix sockets only; every run ends by
//! itself, even against a server that hangs. See bench/README.md.

mod cli;
mod hist;
mod load;
mod payload;
mod probe;
mod report;

use cli::{Config, Mode};
use load::{Counts, GRACE, Slot, Window};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Each connection's thread does little but block in the kernel.
const STACK: usize = 256 * 1024;

/// Run the load and collect what every thread counted. Err: a thread could
/// not be started.
fn run(cfg: Config) -> Result<report::Run, String> {
    let cfg = Arc::new(cfg);
    let win = Arc::new(Window::new(&cfg));
    let slots: Arc<Vec<Slot>> = Arc::new((0..cfg.connections).map(|_| Slot::default()).collect());
    let mut threads = Vec::with_capacity(cfg.connections);
    let n = cfg.connections;
    for id in 0..n {
        let (cfg, win, slots) = (cfg.clone(), win.clone(), slots.clone());
        let t = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(STACK)
            .spawn(move || load::run_one(&cfg, &win, &slots[id], id as u64))
            .map_err(|e| format!("cannot start thread {id} of {n}: {e}; lower -c"))?;
        threads.push(t);
    }

    std::thread::sleep(win.end.saturating_duration_since(Instant::now()));
    let (mut in_flight, mut oldest) = (0, Duration::ZERO);
    for s in slots.iter() {
        let v = s.in_flight.load(Ordering::Relaxed);
        if v > 0 {
            in_flight += 1;
            let started = win.start + Duration::from_nanos(v - 1);
            oldest = oldest.max(win.end.saturating_duration_since(started));
        }
    }

    // Every socket operation ends by grace_end; this deadline is for a
    // thread stuck anyway (a kernel that ignores a timeout): the report
    // goes out without it, and leaving main ends the process.
    let hard = win.grace_end + GRACE;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < hard {
        std::thread::sleep(Duration::from_millis(10));
    }
    let unfinished = threads.iter().filter(|t| !t.is_finished()).count();

    let mut counts = Counts::default();
    let mut starved = 0;
    for s in slots.iter() {
        let c = s.counts.lock().unwrap_or_else(|e| e.into_inner());
        starved += usize::from(c.hist.count() == 0);
        counts.merge(&c);
    }
    Ok(report::Run {
        counts,
        elapsed: cfg.duration.as_secs_f64(),
        starved,
        in_flight_at_end: in_flight,
        oldest_in_flight_ms: oldest.as_secs_f64() * 1000.0,
        unfinished,
    })
}

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
    let r = match run(cfg.clone()) {
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
    if cfg.fail_on_error && r.counts.errors.total() > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
