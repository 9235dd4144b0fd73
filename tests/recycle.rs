//! Recycling by `max_memory` and `max_age`: the replacement starts first,
//! so the pool never has fewer ready workers than its size.
//!
//! This file has its own `main` (`harness = false` in Cargo.toml): with
//! `PREFORKD_TEST_DAEMON=1` the binary is a preforkd daemon with the test
//! plugin `grow` (echo that allocates and touches `mib` MiB per connection
//! and keeps it: a worker whose memory grows); otherwise it runs the tests,
//! each starting this same binary as its daemon.

mod common;

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use preforkd::handler::{Connection, Handlers, PluginInfo, Recv, Registry, StreamHandler};

const DAEMON_ENV: &str = "PREFORKD_TEST_DAEMON";

/// Memory the `grow` plugin keeps, per worker.
static KEPT: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Echo that first allocates `mib` MiB, writes every page, and keeps it.
struct Grow {
    mib: usize,
}

impl StreamHandler for Grow {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let mut block = vec![0u8; self.mib << 20];
        for i in (0..block.len()).step_by(4096) {
            block[i] = 1;
        }
        KEPT.lock().unwrap().push(block);
        let mut buf = [0u8; 4096];
        loop {
            match conn.recv(&mut buf)? {
                Recv::Data(n) => conn.write_all(&buf[..n])?,
                Recv::Eof | Recv::Shutdown => return Ok(()),
            }
        }
    }
}

fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register(PluginInfo::new("grow", "test plugin", |ctx| {
        let mib = ctx
            .options
            .get("mib")
            .and_then(|v| v.as_integer())
            .ok_or("plugin \"grow\" needs mib = N")?;
        Ok(Handlers::stream(Grow { mib: mib as usize }))
    }));
    r
}

fn start(config: &str) -> Daemon {
    let exe = std::env::current_exe().expect("current_exe");
    Daemon::start_bin(&exe, config, &[(DAEMON_ENV, "1")])
}

const CONTROL: &str = "[control]\nsocket = \"{dir}/ctl.sock\"\n\n";

/// A worker whose memory grows past max_memory is recycled: a replacement
/// is started and ready before it is asked to stop, and the pool never has
/// fewer ready workers than its size meanwhile.
fn max_memory_recycles_a_growing_worker() {
    let config = format!(
        "{CONTROL}{}[service.handler.options]\nmib = 24\n",
        service(
            "grow",
            &["tcp://127.0.0.1:0"],
            "grow",
            "workers = 2\nmax_memory = \"64MiB\""
        )
    );
    let d = start(&config);
    d.wait_ready();
    let addr = d.addr("tcp", "grow");
    wait_settled(&d);
    let sampler = ReadySampler::start(&d, "grow");
    let mut sent = 0;
    let line = wait_for(Duration::from_secs(60), || {
        if sent < 24 {
            echo_once(addr, b"grow\n").unwrap();
            sent += 1;
        }
        d.log_text()
            .lines()
            .find(|l| l.contains("): replaced by "))
            .map(str::to_string)
    })
    .unwrap_or_else(|| {
        panic!(
            "no worker was recycled after {sent} connections:\n{}",
            d.log_text()
        )
    });
    let old = pid_in(&line);
    assert!(
        wait_for(DEADLINE, || (!alive(old)).then_some(())).is_some(),
        "recycled worker {old} still alive:\n{}",
        d.log_text()
    );
    // The replacement serves.
    echo_once(addr, b"after\n").unwrap();
    wait_settled(&d);
    let (min, samples) = sampler.finish();
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("(pid {old}): resident memory "))
                && l.contains(" > max_memory 64.0 MiB; recycling")),
        "the reason is not logged:\n{log}"
    );
    assert!(replaced_first(&log) >= 1);
    assert!(samples >= 3, "only {samples} status samples");
    assert!(
        min >= 2,
        "the pool had only {min} ready workers while recycling:\n{log}"
    );
}

/// max_age recycles workers one at a time, each replaced first; the pool
/// stays at its size throughout.
fn max_age_recycles_one_at_a_time() {
    let config = service(
        "aged",
        &["tcp://127.0.0.1:0"],
        "echo",
        "workers = 2\nmax_age = \"2s\"\nmax_age_jitter = \"500ms\"",
    );
    let d = start(&format!("{CONTROL}{config}"));
    d.wait_ready();
    let addr = d.addr("tcp", "aged");
    let sampler = ReadySampler::start(&d, "aged");
    let end = Instant::now() + Duration::from_secs(60);
    while d.count_log("): replaced by ") < 3 && Instant::now() < end {
        echo_once(addr, b"x\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let (min, samples) = sampler.finish();
    let log = d.log_text();
    assert!(replaced_first(&log) >= 3, "fewer than 3 recycles:\n{log}");
    assert!(log.contains("> max_age 2s"), "{log}");
    assert!(samples >= 3, "only {samples} status samples");
    assert!(min >= 2, "only {min} ready workers while recycling:\n{log}");
    // One at a time: never two replacements started before a stop.
    let mut open = 0;
    for l in log.lines() {
        if l.contains("; recycling (a replacement starts first)") {
            open += 1;
            assert!(open <= 1, "two recycles at once:\n{log}");
        }
        if l.contains("): replaced by ") {
            open -= 1;
        }
    }
}

fn main() {
    if std::env::var_os(DAEMON_ENV).is_some_and(|v| v == "1") {
        preforkd::cli::main_with(registry());
    }
    let tests: [(&str, fn()); 2] = [
        (
            "max_memory_recycles_a_growing_worker",
            max_memory_recycles_a_growing_worker,
        ),
        (
            "max_age_recycles_one_at_a_time",
            max_age_recycles_one_at_a_time,
        ),
    ];
    run_tests(&tests);
}
