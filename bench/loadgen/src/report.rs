//! The summary of a run, for people (a few lines) and for scripts (one JSON
//! object whose keys bench/ab.py and bench/reload.py read).

use crate::cli::{Config, Engine, Mode};
use crate::load::Counts;

/// What the main thread saw besides the counts.
pub struct Run {
    pub counts: Counts,
    /// Seconds in the measured window.
    pub elapsed: f64,
    /// Connections that completed no request in the window (a server that
    /// accepts fewer connections than asked starves the rest).
    pub starved: usize,
    /// Requests unanswered when the window closed, and the oldest's age.
    pub in_flight_at_end: usize,
    pub oldest_in_flight_ms: f64,
    /// Client threads (connections' or loops') still running at the hard
    /// deadline (what they counted is lost to the report; the process
    /// exits all the same).
    pub unfinished: usize,
    /// hold mode's outcome.
    pub hold: Option<Hold>,
}

/// What hold mode found.
#[derive(Default)]
pub struct Hold {
    /// Connections that connected and answered one echo before the idle
    /// time ...
    pub held: usize,
    /// ... and those that answered again after it.
    pub served: usize,
    /// How long the setup took (the slowest loop's).
    pub setup_ms: f64,
}

fn json_string(s: &str) -> String {
    let mut o = String::from('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// (the human summary, the JSON line).
pub fn render(cfg: &Config, r: &Run) -> (String, String) {
    let c = &r.counts;
    let h = &c.hist;
    let rate = h.count() as f64 / r.elapsed.max(1e-9);
    let unit = if cfg.mode == Mode::Connect {
        "conn/s"
    } else {
        "req/s"
    };
    let lat = [
        ("min", us(h.min())),
        ("mean", h.mean() / 1000.0),
        ("p50", us(h.percentile(50.0))),
        ("p90", us(h.percentile(90.0))),
        ("p99", us(h.percentile(99.0))),
        ("p999", us(h.percentile(99.9))),
        ("max", us(h.max())),
    ];
    let errors = c.errors.fields();
    let total = c.errors.total();
    let idle = c.idle_before_send + c.idle_after_send;

    let engine = match cfg.engine {
        Engine::Epoll => format!(
            "epoll, {} loop{}",
            cfg.loops,
            if cfg.loops == 1 { "" } else { "s" }
        ),
        Engine::Threads => "threads".to_string(),
    };
    let mut text = format!(
        "loadgen {} {}  c={} size={}  ({engine})  ",
        cfg.mode.name(),
        cfg.target,
        cfg.connections,
        cfg.size,
    );
    match &r.hold {
        Some(_) => text += &format!("idle {:.2}s\n", r.elapsed),
        None => {
            text += &format!(
                "measured {:.2}s after {:.1}s warm-up\n",
                r.elapsed,
                cfg.warmup.as_secs_f64()
            )
        }
    }
    match &r.hold {
        Some(hold) => {
            text += &format!(
                "  held {} of {} (connected and answered in {:.0} ms); answered again after the idle time {}; all served: {}\n",
                hold.held,
                cfg.connections,
                hold.setup_ms,
                hold.served,
                if hold.served == cfg.connections {
                    "yes"
                } else {
                    "no"
                }
            );
            text += &format!("  completed  {} round trips\n", h.count());
        }
        None => text += &format!("  completed  {}  rate {rate:.1} {unit}\n", h.count()),
    }
    text += &format!(
        "  latency us  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}\n",
        lat[2].1, lat[3].1, lat[4].1, lat[5].1, lat[6].1, lat[1].1
    );
    let kinds: Vec<String> = errors
        .iter()
        .filter(|e| e.1 > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    text += &format!(
        "  errors     {total}{}\n",
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    );
    text += &format!(
        "  server_closed_idle {idle} (send failed {}, no answer {})  connects {}{}\n",
        c.idle_before_send,
        c.idle_after_send,
        c.connects,
        if cfg.mode == Mode::Udp {
            format!("  late replies {}", c.late_replies)
        } else {
            String::new()
        }
    );
    text += &format!(
        "  at the end  {} in flight, oldest {:.1} ms; starved {} of {}{}\n",
        r.in_flight_at_end,
        r.oldest_in_flight_ms,
        r.starved,
        cfg.connections,
        if r.unfinished > 0 {
            format!("; {} client threads stuck past the deadline", r.unfinished)
        } else {
            String::new()
        }
    );
    if cfg.mode == Mode::Connect && cfg.src_ips == 1 && rate > 10_000.0 {
        text += "  note: one source address caps new connections near 14k/s; try --src-ips 16\n";
    }

    let field = |(k, v): &(&str, f64)| format!("\"{k}\":{v:.1}");
    let count = |(k, v): &(&str, u64)| format!("\"{k}\":{v}");
    let json = format!(
        concat!(
            "{{\"mode\":{},\"target\":{},\"connections\":{},\"size\":{},\"warmup_s\":{:.3},",
            "\"duration_s\":{:.3},\"requests\":{},\"rate\":{:.1},\"unit\":{},\"latency_us\":{{{}}},",
            "\"errors\":{{{}}},\"errors_total\":{},\"server_closed_idle\":{},",
            "\"closed_idle_before_send\":{},\"closed_idle_after_send\":{},\"connects\":{},",
            "\"late_replies\":{},\"starved\":{},\"in_flight_at_end\":{},\"oldest_in_flight_ms\":{:.1},",
            "\"unfinished_threads\":{},\"src_ips\":{},\"engine\":{},\"loops\":{}{}}}"
        ),
        json_string(cfg.mode.name()),
        json_string(&cfg.target.to_string()),
        cfg.connections,
        cfg.size,
        cfg.warmup.as_secs_f64(),
        r.elapsed,
        h.count(),
        rate,
        json_string(unit),
        lat.iter().map(field).collect::<Vec<_>>().join(","),
        errors.iter().map(count).collect::<Vec<_>>().join(","),
        total,
        idle,
        c.idle_before_send,
        c.idle_after_send,
        c.connects,
        c.late_replies,
        r.starved,
        r.in_flight_at_end,
        r.oldest_in_flight_ms,
        r.unfinished,
        cfg.src_ips,
        json_string(cfg.engine.name()),
        cfg.loops,
        match &r.hold {
            Some(hold) => format!(
                ",\"held\":{},\"served\":{},\"all_served\":{},\"setup_ms\":{:.1},\"hold_s\":{:.3}",
                hold.held,
                hold.served,
                hold.served == cfg.connections,
                hold.setup_ms,
                r.elapsed
            ),
            None => String::new(),
        }
    );
    (text, json)
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
