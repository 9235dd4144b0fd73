//! The master's counters, in shared memory: what `/metrics` reports beyond
//! the scoreboard. The master maps the region before it forks anything and
//! is its only writer; the metrics child (src/metrics.rs) only reads it.
//!
//! Per service (by name, across reloads: a service a reload removes keeps
//! its totals) it holds cumulative counts: spawns and exits by cause, the
//! connections of workers that have exited (a scoreboard slot is reused
//! once its worker is gone, so the master folds a dead worker's final count
//! in here when it reaps it), the times the pool was at `max_workers` with
//! no idle worker, and the listen queue as the master last sampled it. Per
//! scoreboard slot it holds which service the slot's worker belongs to and
//! its state (starting, ready, stopping), so that the reader can count
//! workers by state and add live workers' counts to the totals.
//!
//! Consistency: the master brackets every change with a sequence counter
//! (odd while it writes, a seqlock); the reader retries a snapshot taken
//! while the counter moved. Workers' scoreboard counters only grow, so they
//! need no bracket.
//!
//! Owns: the mapping (for the life of the process).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::scoreboard::{CAPACITY, Scoreboard};

/// Services the region has room for; later ones are not reported.
pub const MAX_SERVICES: usize = 256;

/// Why a worker was started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SpawnCause {
    /// A generation's first workers (start, reload).
    #[default]
    Start,
    /// The replacement of a worker that exited.
    Replace,
    /// A pool grew: dynamic or ondemand policy, `scale`, SIGTTIN.
    Grow,
    /// The replacement started before a worker is recycled (`max_memory`,
    /// `max_age`).
    Recycle,
}

impl SpawnCause {
    /// Every cause, in label order.
    pub const ALL: [SpawnCause; 4] = [
        SpawnCause::Start,
        SpawnCause::Replace,
        SpawnCause::Grow,
        SpawnCause::Recycle,
    ];

    /// The `cause` label.
    pub fn label(self) -> &'static str {
        match self {
            SpawnCause::Start => "start",
            SpawnCause::Replace => "replace",
            SpawnCause::Grow => "grow",
            SpawnCause::Recycle => "recycle",
        }
    }
}

/// Why a worker exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// Asked to stop and left cleanly: stop, reload, scale down, an idle
    /// worker of a dynamic pool retired.
    Stopped,
    /// Left by itself after `max_requests` (an event-driven worker:
    /// recycled by the master, a replacement first).
    MaxRequests,
    /// Recycled by the master after passing `max_memory`.
    MaxMemory,
    /// Recycled by the master after `max_age`.
    MaxAge,
    /// An ondemand worker idle for `idle_worker_timeout`.
    Idle,
    /// Failed to boot (exited before it was ready).
    BootFailed,
    /// Exited with a non-zero status.
    Error,
    /// Killed by a signal the master did not send (a crash, the OOM killer).
    Signal,
    /// Killed by the master (SIGKILL at a stop or ready deadline).
    Killed,
    /// Found stuck past its service's `timeout` (SIGABRT, then SIGKILL).
    Stuck,
}

impl ExitCause {
    /// Every cause, in label order.
    pub const ALL: [ExitCause; 10] = [
        ExitCause::Stopped,
        ExitCause::MaxRequests,
        ExitCause::MaxMemory,
        ExitCause::MaxAge,
        ExitCause::Idle,
        ExitCause::BootFailed,
        ExitCause::Error,
        ExitCause::Signal,
        ExitCause::Killed,
        ExitCause::Stuck,
    ];

    /// The `cause` label.
    pub fn label(self) -> &'static str {
        match self {
            ExitCause::Stopped => "stopped",
            ExitCause::MaxRequests => "max_requests",
            ExitCause::MaxMemory => "max_memory",
            ExitCause::MaxAge => "max_age",
            ExitCause::Idle => "idle",
            ExitCause::BootFailed => "boot_failed",
            ExitCause::Error => "error",
            ExitCause::Signal => "signal",
            ExitCause::Killed => "killed",
            ExitCause::Stuck => "stuck",
        }
    }
}

/// A worker's state, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Forked, not ready yet.
    Starting,
    /// Ready: idle or busy, as its scoreboard slot says.
    Ready,
    /// Asked to stop, finishing its connections.
    Stopping,
}

// Header words.
const H_SEQ: usize = 0;
const H_START_MS: usize = 1;
const H_GENERATION: usize = 2;
const H_RELOADS_OK: usize = 3;
const H_RELOADS_FAILED: usize = 4;
const H_SERVICES: usize = 5;
/// The master's heartbeat: [`crate::sys::coarse_ms`] at its last turn.
const H_BEAT: usize = 6;
/// [`Readiness`], encoded.
const H_READY: usize = 7;
const HEADER: usize = 8;

/// Whether the daemon takes clients now, as `GET /ready` tells a load
/// balancer (written by the master each turn of its loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Every service has a ready worker, and the daemon is not leaving.
    Ready,
    /// The first generation is booting.
    Starting,
    /// SIGTERM came: the shutdown delay runs.
    Delay {
        /// When it ends (coarse clock, ms).
        until_ms: u64,
    },
    /// The graceful or fast stop has begun.
    Stopping,
    /// A binary upgrade handed over: this master's workers drain.
    Retiring,
    /// A service has too few ready workers.
    Short {
        /// Its index in [`Snapshot::services`].
        service: usize,
        /// Its ready workers.
        ready: u64,
        /// Its pool's size.
        size: u64,
    },
}

impl Readiness {
    /// One word: the kind in the low 4 bits, its figures above.
    fn encode(self) -> u64 {
        match self {
            Readiness::Ready => 1,
            Readiness::Starting => 2,
            Readiness::Delay { until_ms } => 3 | until_ms << 4,
            Readiness::Stopping => 4,
            Readiness::Retiring => 5,
            Readiness::Short {
                service,
                ready,
                size,
            } => {
                6 | (service.min(0xffff) as u64) << 4
                    | ready.min(0xf_ffff) << 20
                    | size.min(0xf_ffff) << 40
            }
        }
    }

    fn decode(w: u64) -> Readiness {
        match w & 0xf {
            1 => Readiness::Ready,
            3 => Readiness::Delay { until_ms: w >> 4 },
            4 => Readiness::Stopping,
            5 => Readiness::Retiring,
            6 => Readiness::Short {
                service: ((w >> 4) & 0xffff) as usize,
                ready: (w >> 20) & 0xf_ffff,
                size: (w >> 40) & 0xf_ffff,
            },
            _ => Readiness::Starting,
        }
    }
}

// Per-service words.
const S_NAME: usize = 0; // 8 words: up to 64 bytes of name
const S_NAME_LEN: usize = 8;
const S_POOL_KIND: usize = 9;
const S_SPAWNS: usize = 10; // SpawnCause::ALL.len() words
const S_EXITS: usize = S_SPAWNS + SpawnCause::ALL.len();
const S_FOLDED: usize = S_EXITS + ExitCause::ALL.len();
const S_AT_MAX: usize = S_FOLDED + 1;
const S_QUEUE: usize = S_AT_MAX + 1;
const S_BACKLOG: usize = S_QUEUE + 1;
const S_QUEUE_KNOWN: usize = S_BACKLOG + 1;
const S_MAX_WORKERS: usize = S_QUEUE_KNOWN + 1;
const S_REFUSED: usize = S_MAX_WORKERS + 1;
const S_BYTES_IN: usize = S_REFUSED + 1;
const S_BYTES_OUT: usize = S_BYTES_IN + 1;
const SERVICE_WORDS: usize = 40;
const _: () = assert!(S_BYTES_OUT < SERVICE_WORDS);

const SERVICES_AT: usize = HEADER;
const SLOTS_AT: usize = SERVICES_AT + MAX_SERVICES * SERVICE_WORDS;
const TOTAL: usize = SLOTS_AT + CAPACITY;

/// The region, as the master (writer) and the metrics child (reader) hold it.
pub struct Stats {
    words: &'static [AtomicU64],
    /// In the master: service names in index order.
    names: Vec<String>,
}

/// One service's figures in a [`Snapshot`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// The service name.
    pub name: String,
    /// 0 static, 1 dynamic, 2 ondemand.
    pub pool_kind: u64,
    /// Spawns, in [`SpawnCause::ALL`] order.
    pub spawns: Vec<u64>,
    /// Exits, in [`ExitCause::ALL`] order.
    pub exits: Vec<u64>,
    /// Connections served by workers that have exited.
    pub folded: u64,
    /// Connections refused by exited workers (allow/deny, per-address limit).
    pub folded_refused: u64,
    /// Bytes read from clients by exited workers.
    pub folded_bytes_in: u64,
    /// Bytes written to clients by exited workers.
    pub folded_bytes_out: u64,
    /// Times the pool hit `max_workers` with no idle worker.
    pub at_max: u64,
    /// The listen queue length last sampled, if the OS tells it.
    pub queue: Option<u64>,
    /// The listen backlog of the sampled listeners.
    pub backlog: u64,
    /// `max_workers` (0: static pool).
    pub max_workers: u64,
    /// Live workers: (state, scoreboard slot).
    pub workers: Vec<(WorkerState, usize)>,
}

/// A consistent copy of the region.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The master's start, milliseconds since the Unix epoch.
    pub start_ms: u64,
    /// The generation in force.
    pub generation: u64,
    /// Reloads that succeeded.
    pub reloads_ok: u64,
    /// Reloads that failed.
    pub reloads_failed: u64,
    /// Every service ever configured in this master.
    pub services: Vec<ServiceStats>,
}

impl Stats {
    /// Maps the region. Call in the master before the first fork.
    pub fn new() -> std::io::Result<Stats> {
        let words = crate::sys::shared_atomics(TOTAL)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        words[H_START_MS].store(now, Ordering::Relaxed);
        Ok(Stats {
            words,
            names: Vec::new(),
        })
    }

    fn write(&self, f: impl FnOnce(&[AtomicU64])) {
        self.words[H_SEQ].fetch_add(1, Ordering::AcqRel);
        f(self.words);
        self.words[H_SEQ].fetch_add(1, Ordering::Release);
    }

    fn service_base(i: usize) -> usize {
        SERVICES_AT + i * SERVICE_WORDS
    }

    /// The index of service `name`, registered on first use; None once
    /// [`MAX_SERVICES`] are registered.
    pub fn service(&mut self, name: &str) -> Option<usize> {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return Some(i);
        }
        if self.names.len() >= MAX_SERVICES {
            return None;
        }
        let i = self.names.len();
        self.names.push(name.to_string());
        let base = Stats::service_base(i);
        let bytes = name.as_bytes();
        let len = bytes.len().min(64);
        self.write(|w| {
            for (k, chunk) in bytes[..len].chunks(8).enumerate() {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                w[base + S_NAME + k].store(u64::from_le_bytes(word), Ordering::Relaxed);
            }
            w[base + S_NAME_LEN].store(len as u64, Ordering::Relaxed);
            w[H_SERVICES].store((i + 1) as u64, Ordering::Relaxed);
        });
        Some(i)
    }

    /// Sets a service's pool kind (0 static, 1 dynamic, 2 ondemand) and
    /// `max_workers`.
    pub fn set_pool(&self, svc: Option<usize>, kind: u64, max_workers: u64) {
        let Some(i) = svc else { return };
        let base = Stats::service_base(i);
        self.write(|w| {
            w[base + S_POOL_KIND].store(kind, Ordering::Relaxed);
            w[base + S_MAX_WORKERS].store(max_workers, Ordering::Relaxed);
        });
    }

    /// Counts a spawn; records the worker's slot as starting.
    pub fn spawned(&self, svc: Option<usize>, cause: SpawnCause, board: Option<usize>) {
        let Some(i) = svc else { return };
        let base = Stats::service_base(i);
        let c = SpawnCause::ALL
            .iter()
            .position(|x| *x == cause)
            .unwrap_or(0);
        self.write(|w| {
            w[base + S_SPAWNS + c].fetch_add(1, Ordering::Relaxed);
            if let Some(b) = board {
                w[SLOTS_AT + b].store(slot_word(i, WorkerState::Starting), Ordering::Relaxed);
            }
        });
    }

    /// A worker's state changed.
    pub fn set_state(&self, svc: Option<usize>, board: Option<usize>, state: WorkerState) {
        let (Some(i), Some(b)) = (svc, board) else {
            return;
        };
        self.write(|w| w[SLOTS_AT + b].store(slot_word(i, state), Ordering::Relaxed));
    }

    /// Counts an exit, and folds the worker's final connection count in
    /// (call before its scoreboard slot is released).
    pub fn exited(
        &self,
        svc: Option<usize>,
        cause: ExitCause,
        board: Option<usize>,
        scoreboard: &Scoreboard,
    ) {
        let (served, refused, bytes_in, bytes_out) = board.map_or((0, 0, 0, 0), |b| {
            let c = scoreboard.read(b);
            (c.served + c.active, c.refused, c.bytes_in, c.bytes_out)
        });
        let c = ExitCause::ALL.iter().position(|x| *x == cause).unwrap_or(0);
        self.write(|w| {
            if let Some(i) = svc {
                let base = Stats::service_base(i);
                w[base + S_EXITS + c].fetch_add(1, Ordering::Relaxed);
                w[base + S_FOLDED].fetch_add(served, Ordering::Relaxed);
                w[base + S_REFUSED].fetch_add(refused, Ordering::Relaxed);
                w[base + S_BYTES_IN].fetch_add(bytes_in, Ordering::Relaxed);
                w[base + S_BYTES_OUT].fetch_add(bytes_out, Ordering::Relaxed);
            }
            if let Some(b) = board {
                w[SLOTS_AT + b].store(0, Ordering::Relaxed);
            }
        });
    }

    /// The pool reached `max_workers` with no idle worker.
    pub fn at_max(&self, svc: Option<usize>) {
        let Some(i) = svc else { return };
        let base = Stats::service_base(i);
        self.write(|w| {
            w[base + S_AT_MAX].fetch_add(1, Ordering::Relaxed);
        });
    }

    /// The listen queue length and backlog last sampled (None: unknown).
    pub fn set_queue(&self, svc: Option<usize>, queue: Option<(u64, u64)>) {
        let Some(i) = svc else { return };
        let base = Stats::service_base(i);
        self.write(|w| {
            let (q, b) = queue.unwrap_or((0, 0));
            w[base + S_QUEUE].store(q, Ordering::Relaxed);
            w[base + S_BACKLOG].store(b, Ordering::Relaxed);
            w[base + S_QUEUE_KNOWN].store(u64::from(queue.is_some()), Ordering::Relaxed);
        });
    }

    /// Times service `svc`'s pool was at `max_workers` with none idle.
    pub fn at_max_count(&self, svc: Option<usize>) -> u64 {
        svc.map_or(0, |i| {
            self.words[Stats::service_base(i) + S_AT_MAX].load(Ordering::Relaxed)
        })
    }

    /// The generation in force.
    pub fn set_generation(&self, generation: u64) {
        self.write(|w| w[H_GENERATION].store(generation, Ordering::Relaxed));
    }

    /// The master's loop turned at `now_ms` (coarse clock).
    pub fn beat(&self, now_ms: u64) {
        self.words[H_BEAT].store(now_ms, Ordering::Relaxed);
    }

    /// When the master's loop last turned (coarse ms; 0: not yet).
    pub fn beat_ms(&self) -> u64 {
        self.words[H_BEAT].load(Ordering::Relaxed)
    }

    /// Publishes the daemon's readiness.
    pub fn set_readiness(&self, r: Readiness) {
        self.words[H_READY].store(r.encode(), Ordering::Relaxed);
    }

    /// The daemon's readiness as the master last published it.
    pub fn readiness(&self) -> Readiness {
        Readiness::decode(self.words[H_READY].load(Ordering::Relaxed))
    }

    /// Counts a reload's outcome.
    pub fn reloaded(&self, ok: bool) {
        let at = if ok { H_RELOADS_OK } else { H_RELOADS_FAILED };
        self.write(|w| {
            w[at].fetch_add(1, Ordering::Relaxed);
        });
    }

    /// A consistent copy (retried while the master writes; after many
    /// tries, the last copy).
    pub fn snapshot(&self) -> Snapshot {
        let w = self.words;
        let mut snap = Snapshot::default();
        for _ in 0..1000 {
            let before = w[H_SEQ].load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            snap = self.read_all();
            std::sync::atomic::fence(Ordering::Acquire);
            if w[H_SEQ].load(Ordering::Relaxed) == before {
                break;
            }
        }
        snap
    }

    fn read_all(&self) -> Snapshot {
        let w = self.words;
        let get = |i: usize| w[i].load(Ordering::Relaxed);
        let n = (get(H_SERVICES) as usize).min(MAX_SERVICES);
        let mut services: Vec<ServiceStats> = (0..n)
            .map(|i| {
                let base = Stats::service_base(i);
                let len = (get(base + S_NAME_LEN) as usize).min(64);
                let mut name = Vec::with_capacity(64);
                for k in 0..8 {
                    name.extend_from_slice(&get(base + S_NAME + k).to_le_bytes());
                }
                name.truncate(len);
                ServiceStats {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    pool_kind: get(base + S_POOL_KIND),
                    spawns: (0..SpawnCause::ALL.len())
                        .map(|c| get(base + S_SPAWNS + c))
                        .collect(),
                    exits: (0..ExitCause::ALL.len())
                        .map(|c| get(base + S_EXITS + c))
                        .collect(),
                    folded: get(base + S_FOLDED),
                    folded_refused: get(base + S_REFUSED),
                    folded_bytes_in: get(base + S_BYTES_IN),
                    folded_bytes_out: get(base + S_BYTES_OUT),
                    at_max: get(base + S_AT_MAX),
                    queue: (get(base + S_QUEUE_KNOWN) == 1).then(|| get(base + S_QUEUE)),
                    backlog: get(base + S_BACKLOG),
                    max_workers: get(base + S_MAX_WORKERS),
                    workers: Vec::new(),
                }
            })
            .collect();
        for b in 0..CAPACITY {
            let word = get(SLOTS_AT + b);
            if word == 0 {
                continue;
            }
            let (svc, state) = unpack_slot(word);
            if let (Some(s), Some(state)) = (services.get_mut(svc), state) {
                s.workers.push((state, b));
            }
        }
        Snapshot {
            start_ms: get(H_START_MS),
            generation: get(H_GENERATION),
            reloads_ok: get(H_RELOADS_OK),
            reloads_failed: get(H_RELOADS_FAILED),
            services,
        }
    }
}

fn slot_word(svc: usize, state: WorkerState) -> u64 {
    let s = match state {
        WorkerState::Starting => 1,
        WorkerState::Ready => 2,
        WorkerState::Stopping => 3,
    };
    (svc as u64 + 1) | (s << 32)
}

fn unpack_slot(word: u64) -> (usize, Option<WorkerState>) {
    let svc = (word & 0xffff_ffff) as usize;
    let state = match word >> 32 {
        1 => Some(WorkerState::Starting),
        2 => Some(WorkerState::Ready),
        3 => Some(WorkerState::Stopping),
        _ => None,
    };
    (svc.wrapping_sub(1), state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forked_reader_sees_what_the_master_wrote() {
        let mut stats = Stats::new().unwrap();
        let mut board = Scoreboard::new().unwrap();
        let echo = stats.service("echo");
        let other = stats.service("other-service");
        assert_eq!(stats.service("echo"), echo);
        stats.set_pool(echo, 1, 8);
        let b = board.claim();
        stats.spawned(echo, SpawnCause::Start, b);
        stats.set_state(echo, b, WorkerState::Ready);
        let b2 = board.claim();
        stats.spawned(other, SpawnCause::Grow, b2);
        board.slot(b2.unwrap()).begin();
        board.slot(b2.unwrap()).end();
        stats.exited(other, ExitCause::MaxMemory, b2, &board);
        stats.reloaded(true);
        stats.reloaded(false);
        stats.reloaded(false);
        stats.set_generation(3);
        stats.at_max(echo);
        stats.set_queue(echo, Some((2, 128)));
        let snap = match crate::sys::fork().unwrap() {
            crate::sys::Forked::Child => {
                let s = stats.snapshot();
                let ok = s.generation == 3
                    && s.reloads_ok == 1
                    && s.reloads_failed == 2
                    && s.services.len() == 2
                    && s.services[0].workers == vec![(WorkerState::Ready, b.unwrap())]
                    && s.services[1].workers.is_empty();
                crate::sys::exit_now(if ok { 0 } else { 1 });
            }
            crate::sys::Forked::Parent(pid) => {
                let st = nix::sys::wait::waitpid(pid, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(pid, 0));
                stats.snapshot()
            }
        };
        let e = &snap.services[0];
        assert_eq!(e.name, "echo");
        assert_eq!((e.pool_kind, e.max_workers, e.at_max), (1, 8, 1));
        assert_eq!((e.queue, e.backlog), (Some(2), 128));
        assert_eq!(e.spawns, vec![1, 0, 0, 0]);
        let o = &snap.services[1];
        assert_eq!(o.name, "other-service");
        assert_eq!(o.spawns, vec![0, 0, 1, 0]);
        assert_eq!(o.exits[2], 1, "max_memory");
        assert_eq!(o.folded, 1);
        assert_eq!(o.queue, None);
        assert!(snap.start_ms > 0);
    }

    #[test]
    fn readiness_survives_its_encoding() {
        let stats = Stats::new().unwrap();
        assert_eq!(
            stats.readiness(),
            Readiness::Starting,
            "before the first turn"
        );
        for r in [
            Readiness::Ready,
            Readiness::Starting,
            Readiness::Delay {
                until_ms: 86_400_000 * 365,
            },
            Readiness::Stopping,
            Readiness::Retiring,
            Readiness::Short {
                service: 3,
                ready: 0,
                size: 1000,
            },
        ] {
            stats.set_readiness(r);
            assert_eq!(stats.readiness(), r);
        }
        stats.beat(1234);
        assert_eq!(stats.beat_ms(), 1234);
    }

    #[test]
    fn long_names_are_cut_at_64_bytes() {
        let mut stats = Stats::new().unwrap();
        let name = "x".repeat(64);
        stats.service(&name);
        assert_eq!(stats.snapshot().services[0].name, name);
    }
}
