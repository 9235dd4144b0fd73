//! The scoreboard: one slot per worker, in memory the master maps (shared,
//! anonymous) before it forks anything. A worker writes only its own slot,
//! its own connection entries and its own table of connections per client
//! address, with atomic stores; the master reads every slot for `preforkd
//! status` and for the stuck-worker check, and a worker reads the address
//! tables of its service's other workers to count the connections of one
//! client address (`max_connections_per_ip`). Nothing touches the disk.
//!
//! Layout (all `AtomicU64` words): a header (`H_HIGH`: one past the
//! highest slot ever claimed, so that scans stay short; `H_SEED`: the
//! address hash's secret), [`CAPACITY`] slots of `WORDS` words (see the
//! `W_*` offsets), then a region of [`ENTRY_CAPACITY`] blocks of
//! `ENTRY_WORDS` words. The master hands out ranges of the region
//! first-fit from a free list, two per worker when its slot is claimed:
//!
//! - connection entries, one per accept thread (an event-driven worker
//!   gets a few, for its oldest connections): the connection being served
//!   (its start, on the coarse monotonic clock, and its peer);
//! - with `max_connections_per_ip`, an address table (see [`IpCounter`]):
//!   two buffers of `buckets` words each, `buckets` the power of two at
//!   least twice the connections the worker can hold (at least 16). A
//!   bucket is `key << 24 | count`: `key` 40 bits of a keyed hash of the
//!   canonical address (never 0), `count` its connections. Word 0: never
//!   used; a key with count 0: a tombstone, reusable. Linear probing from
//!   `key & (buckets - 1)`. The slot's `W_IP_FLIPS` counts the times the
//!   owner rebuilt the live keys into the other buffer; its low bit names
//!   the buffer in use.
//!
//! Hot path cost, per connection: one read of the coarse clock (vDSO, no
//! syscall), four stores to publish the entry and one to clear it, a few
//! relaxed adds (active, served, bytes); with `max_connections_per_ip`, a
//! SipHash of the address, an uncontended lock, a probe of a few words of
//! our own table (one SeqCst store), then a probe of each live table of
//! the service (a few SeqCst loads each), and the same lock and probe to
//! leave. That is O(workers of the service), whatever the connections
//! they hold. An event loop also writes its running connection (four
//! stores) each time it switches connection.
//!
//! Owns: the mapping (for the life of the process) and, in the master, the
//! lists of free slots and free ranges of the region.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Mutex, PoisonError};

/// Header words.
const HEADER: usize = 8;
/// One past the highest slot index ever claimed (scans stop there).
const H_HIGH: usize = 0;
/// Two words of secret for the address hash, drawn when the table is
/// mapped: a client cannot pick addresses that collide in our tables.
const H_SEED: usize = 1;

/// Words per slot: see the `W_*` offsets.
const WORDS: usize = 24;
/// The worker's pid, once it has attached (0: not yet, or slot free).
const W_PID: usize = 0;
/// Connections (or datagrams) served so far.
const W_SERVED: usize = 1;
/// Connections being served right now.
const W_ACTIVE: usize = 2;
/// The generation the worker belongs to (set by the master at claim).
const W_GENERATION: usize = 3;
/// [`State`], as the worker last wrote it.
const W_STATE: usize = 4;
/// Last heartbeat: [`crate::sys::coarse_ms`] (CLOCK_MONOTONIC_COARSE, the
/// same clock in every process).
const W_HEARTBEAT: usize = 5;
/// Bytes read from clients (added when a connection ends).
const W_BYTES_IN: usize = 6;
/// Bytes written to clients.
const W_BYTES_OUT: usize = 7;
/// Connections (datagrams) refused by `allow`/`deny` or
/// `max_connections_per_ip`.
const W_REFUSED: usize = 8;
/// When the slot was claimed, on the coarse clock.
const W_STARTED: usize = 9;
/// The service, as [`service_id`] (0: none).
const W_SERVICE: usize = 10;
/// First block of the worker's entries.
const W_ENTRY_AT: usize = 11;
/// Entries in the range (its accept threads; 0: none).
const W_ENTRIES: usize = 12;
/// Times an event loop was at `worker_connections` and stopped accepting.
const W_FULL: usize = 13;
/// The connection an event loop is running right now: `ENTRY_WORDS`
/// words laid out as an entry (start 0: none).
const W_RUN: usize = 14;
/// First block of the worker's address table.
const W_IP_AT: usize = 18;
/// Buckets per buffer of the address table (0: no table).
const W_IP_BUCKETS: usize = 19;
/// Rebuilds of the address table; the low bit is the buffer in use.
const W_IP_FLIPS: usize = 20;
/// 1 while an [`IpCounter`] of this slot exists (there is one writer).
const W_IP_OWNED: usize = 21;

/// Slots in one master's scoreboard: twice the largest pool the config
/// allows (4096) with room for a reload's second generation of several
/// services. A worker started when every slot is taken runs without one
/// (status then shows no counters for it).
pub const CAPACITY: usize = 16384;

/// Words per connection entry (and per block of the region): see the
/// `E_*` offsets.
const ENTRY_WORDS: usize = 4;
/// When the connection started (coarse clock, ms); 0: no connection.
const E_START: usize = 0;
/// The peer's address, high and low 64 bits (IPv4 as IPv4-mapped IPv6);
/// for a Unix peer whose credentials are known: pid, then uid << 32 | gid.
const E_HI: usize = 1;
const E_LO: usize = 2;
/// Family (low byte, see `F_*`) and port (bits 8..24).
const E_META: usize = 3;

const F_NONE: u64 = 0;
const F_UNIX: u64 = 1;
const F_UNIX_CRED: u64 = 2;
const F_INET4: u64 = 4;
const F_INET6: u64 = 6;

/// Blocks in the region (32 MiB of address space; only what is claimed is
/// ever touched). A worker takes one block per entry, and with
/// `max_connections_per_ip` half a block per bucket (two buffers of one
/// word each): a worker of 1024 threads takes 2048, an event-driven worker
/// of 10,000 connections 16,392, so that sixty of those fit, a reload's
/// second generation included. A
/// worker for which no range is left serves without it (its connections
/// are not in status, or not counted by `max_connections_per_ip`), and the
/// master logs it.
pub const ENTRY_CAPACITY: usize = 1 << 20;

const ENTRIES_AT: usize = HEADER + CAPACITY * WORDS;
const TOTAL: usize = ENTRIES_AT + ENTRY_CAPACITY * ENTRY_WORDS;

/// Bits of a bucket that count connections; the key is above them.
const COUNT_BITS: u32 = 24;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
/// The fewest buckets a table has.
const MIN_BUCKETS: usize = 16;

/// A worker's life, as it writes it in its slot. Idle and busy are
/// [`Counters::active`] being 0 or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum State {
    /// Free, or claimed and not attached yet.
    #[default]
    None,
    /// Attached: initialising its handler.
    Starting,
    /// Serving (idle or busy).
    Ready,
    /// Asked to stop: finishing its connections.
    Stopping,
}

impl State {
    fn from_word(w: u64) -> State {
        match w {
            1 => State::Starting,
            2 => State::Ready,
            3 => State::Stopping,
            _ => State::None,
        }
    }

    fn word(self) -> u64 {
        match self {
            State::None => 0,
            State::Starting => 1,
            State::Ready => 2,
            State::Stopping => 3,
        }
    }
}

/// The mapping: header, slots, region.
#[derive(Clone, Copy)]
struct Table(&'static [AtomicU64]);

impl Table {
    fn slot(self, i: usize) -> &'static [AtomicU64] {
        &self.0[HEADER + i * WORDS..HEADER + (i + 1) * WORDS]
    }

    /// Block `e` of the region.
    fn entry(self, e: usize) -> &'static [AtomicU64] {
        self.blocks(e, 1)
    }

    /// Blocks `at..at + n` of the region, as words.
    fn blocks(self, at: usize, n: usize) -> &'static [AtomicU64] {
        &self.0[ENTRIES_AT + at * ENTRY_WORDS..ENTRIES_AT + (at + n) * ENTRY_WORDS]
    }

    /// Slot `i`'s entry range.
    fn range(self, i: usize) -> std::ops::Range<usize> {
        let w = self.slot(i);
        let at = w[W_ENTRY_AT].load(Ordering::Relaxed) as usize;
        let n = w[W_ENTRIES].load(Ordering::Relaxed) as usize;
        let at = at.min(ENTRY_CAPACITY);
        at..(at + n).min(ENTRY_CAPACITY)
    }

    /// Slot `i`'s address table, if it has one. The words are checked, not
    /// trusted: a reader may see a slot being released and claimed again.
    fn ip(self, i: usize) -> Option<IpTable> {
        let w = self.slot(i);
        let buckets = w[W_IP_BUCKETS].load(Ordering::Relaxed) as usize;
        let at = w[W_IP_AT].load(Ordering::Relaxed) as usize;
        let fits = buckets.is_power_of_two()
            && buckets >= MIN_BUCKETS
            && buckets / 2 <= ENTRY_CAPACITY
            && at <= ENTRY_CAPACITY - buckets / 2;
        let blocks = buckets * 2 / ENTRY_WORDS;
        fits.then(|| IpTable {
            words: self.blocks(at, blocks),
            buckets,
            flips: &w[W_IP_FLIPS],
        })
    }

    fn high(self) -> usize {
        (self.0[H_HIGH].load(Ordering::SeqCst) as usize).min(CAPACITY)
    }

    /// The key of `ip` (canonical) in every address table of this mapping.
    fn ip_key(self, ip: IpAddr) -> u64 {
        let bits = match ip.to_canonical() {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        };
        // SipHash of the secret then the address: a keyed hash, so that
        // clients cannot choose addresses that probe long.
        let mut h = std::hash::DefaultHasher::new();
        h.write_u64(self.0[H_SEED].load(Ordering::Relaxed));
        h.write_u64(self.0[H_SEED + 1].load(Ordering::Relaxed));
        h.write_u128(bits);
        (h.finish() >> COUNT_BITS).max(1)
    }

    /// Connections with `key` held now by the live workers of `service`.
    fn count_key(self, service: u64, key: u64) -> usize {
        let mut n = 0;
        for i in 0..self.high() {
            let w = self.slot(i);
            // SeqCst, as the store in `claim_worker`: a slot seen with our
            // service has its table in place.
            if w[W_SERVICE].load(Ordering::SeqCst) != service {
                continue;
            }
            let Some(t) = self.ip(i) else { continue };
            let c = t.count(key);
            // Released meanwhile (its worker died): its counts are gone.
            if w[W_SERVICE].load(Ordering::SeqCst) == service {
                n += c as usize;
            }
        }
        n
    }
}

/// One worker's address table: two buffers of `buckets` words, and the
/// count of rebuilds that selects one.
#[derive(Clone, Copy)]
struct IpTable {
    words: &'static [AtomicU64],
    buckets: usize,
    flips: &'static AtomicU64,
}

/// Where a key is, or could go, in a buffer.
enum Probe {
    /// At this index, with this word.
    Found(usize, u64),
    /// Absent: the first tombstone on its path and the empty word that
    /// ended it (None: every word probed, none empty).
    Vacant {
        tombstone: Option<usize>,
        empty: Option<usize>,
    },
}

impl IpTable {
    fn buffer(self, flips: u64) -> &'static [AtomicU64] {
        let k = (flips & 1) as usize;
        &self.words[k * self.buckets..(k + 1) * self.buckets]
    }

    /// Linear probing from the key's home to the key or an empty word, at
    /// most every word once. SeqCst loads: see [`IpCounter::enter`].
    fn probe(self, buffer: &[AtomicU64], key: u64) -> Probe {
        let mask = self.buckets - 1;
        let mut tombstone = None;
        for step in 0..self.buckets {
            let at = (key as usize).wrapping_add(step) & mask;
            let w = buffer[at].load(Ordering::SeqCst);
            if w == 0 {
                return Probe::Vacant {
                    tombstone,
                    empty: Some(at),
                };
            }
            if w >> COUNT_BITS == key {
                return Probe::Found(at, w);
            }
            if w & COUNT_MAX == 0 && tombstone.is_none() {
                tombstone = Some(at);
            }
        }
        Probe::Vacant {
            tombstone,
            empty: None,
        }
    }

    /// `key`'s count, read without a lock from any process. The buffer in
    /// use is read between two loads of the flips: if the owner rebuilt the
    /// table meanwhile, the buffer read may have been the one being rebuilt
    /// and the read is tried again (a seqlock read). Each retry needs the
    /// owner to have accepted a quarter table of new addresses during one
    /// probe, so retries are rare and a reader is never blocked by a
    /// writer that stopped.
    fn count(self, key: u64) -> u64 {
        loop {
            let flips = self.flips.load(Ordering::SeqCst);
            let n = match self.probe(self.buffer(flips), key) {
                Probe::Found(_, w) => w & COUNT_MAX,
                Probe::Vacant { .. } => 0,
            };
            // Pairs with the fence in `rebuild`: a word cleared by a
            // rebuild is seen only with the flips that rebuild follows.
            fence(Ordering::Acquire);
            if self.flips.load(Ordering::SeqCst) == flips {
                return n;
            }
        }
    }
}

/// The whole table, as the master holds it.
pub struct Scoreboard {
    table: Table,
    free: Vec<usize>,
    /// Free ranges of the region (start, len), sorted by start, never
    /// adjacent.
    free_entries: Vec<(usize, usize)>,
}

/// A worker's view of its own slot (and, to count peers, of the others').
#[derive(Clone, Copy)]
pub struct Slot {
    table: Table,
    index: usize,
}

/// A worker's writer of its address table, for `max_connections_per_ip`:
/// create one per worker, after fork, and share it between its threads.
///
/// Writers (this worker's threads) take a process-local lock; readers
/// (every worker of the service, in other processes) never lock. When
/// tombstones and keys pass 3/4 of the buckets, the writer rebuilds the
/// live keys into the other buffer and flips to it (SeqCst); a reader that
/// sees the flips change under it reads again, so it never counts from a
/// half-built buffer.
///
/// Three limits, all approximations of the exact count: keys are 40-bit
/// hashes, so two addresses share a count with odds of about n² / 2⁴¹
/// among n addresses (1 in 20,000 for 10,000 addresses); a worker holding
/// more addresses than 3/2 of the capacity its table was sized for counts
/// the extra ones in its own memory, where its own checks see them and
/// other workers' do not; and a count that races the master releasing a
/// dead worker's slot and claiming it again for the same service may read
/// the new worker's (cleared) table instead of the dead one's.
pub struct IpCounter {
    slot: Slot,
    table: IpTable,
    owner: Mutex<Owner>,
}

/// What the writer knows of its table (under the lock).
#[derive(Debug, Default)]
struct Owner {
    /// Words not empty (keys and tombstones) in the buffer in use.
    used: usize,
    /// Keys with a count.
    live: usize,
    /// Connections of keys that found no room (or whose count is full).
    overflow: Vec<(u64, usize)>,
}

/// One accept thread's connection entry.
#[derive(Clone, Copy)]
pub struct Entry {
    words: &'static [AtomicU64],
}

/// What the master reads from a slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// The pid that attached to the slot (0: not yet).
    pub pid: u64,
    /// Connections (or datagrams) served.
    pub served: u64,
    /// Connections in progress.
    pub active: u64,
    /// The generation the slot was claimed for.
    pub generation: u64,
    /// What the worker last said it was doing.
    pub state: State,
    /// Its last heartbeat (coarse clock, ms; 0: none yet).
    pub heartbeat_ms: u64,
    /// Bytes read from clients, counted when each connection ends.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Connections or datagrams refused (access control, per-address limit).
    pub refused: u64,
    /// Times an event loop was at `worker_connections` and stopped
    /// accepting.
    pub full: u64,
    /// When the slot was claimed (coarse clock, ms).
    pub started_ms: u64,
}
/// A connection in progress, as read from an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    /// When it started (coarse clock, ms).
    pub start_ms: u64,
    /// Who is on the other end.
    pub peer: Peer,
}

/// A peer as the scoreboard records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// An IP address and port (an IPv4-mapped IPv6 address is stored, and
    /// shown, as IPv4).
    Inet(SocketAddr),
    /// A Unix socket peer whose credentials (SO_PEERCRED) were read.
    UnixCred {
        /// Its pid.
        pid: u32,
        /// Its uid.
        uid: u32,
        /// Its gid.
        gid: u32,
    },
    /// A Unix socket peer (credentials not read: no rule needed them).
    Unix,
    /// Nothing known.
    Unknown,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Inet(a) => write!(f, "{a}"),
            Peer::UnixCred { pid, uid, gid } => write!(f, "unix:pid={pid},uid={uid},gid={gid}"),
            Peer::Unix => f.write_str("unix"),
            Peer::Unknown => f.write_str("?"),
        }
    }
}

impl Peer {
    /// An IP peer, with an IPv4-mapped IPv6 address taken as IPv4.
    pub fn inet(a: SocketAddr) -> Peer {
        Peer::Inet(SocketAddr::new(a.ip().to_canonical(), a.port()))
    }

    fn encode(&self) -> (u64, u64, u64) {
        let wide = |ip: Ipv6Addr| {
            let bits = u128::from(ip);
            ((bits >> 64) as u64, bits as u64)
        };
        match *self {
            Peer::Inet(a) => {
                let (family, ip) = match a.ip().to_canonical() {
                    IpAddr::V4(v4) => (F_INET4, v4.to_ipv6_mapped()),
                    IpAddr::V6(v6) => (F_INET6, v6),
                };
                let (hi, lo) = wide(ip);
                (hi, lo, family | u64::from(a.port()) << 8)
            }
            Peer::UnixCred { pid, uid, gid } => (
                u64::from(pid),
                u64::from(uid) << 32 | u64::from(gid),
                F_UNIX_CRED,
            ),
            Peer::Unix => (0, 0, F_UNIX),
            Peer::Unknown => (0, 0, F_NONE),
        }
    }

    fn decode(hi: u64, lo: u64, meta: u64) -> Peer {
        let port = (meta >> 8) as u16;
        let ip = Ipv6Addr::from(u128::from(hi) << 64 | u128::from(lo));
        match meta & 0xff {
            F_INET4 => Peer::Inet(SocketAddr::new(ip.to_canonical(), port)),
            F_INET6 => Peer::Inet(SocketAddr::new(IpAddr::V6(ip), port)),
            F_UNIX_CRED => Peer::UnixCred {
                pid: hi as u32,
                uid: (lo >> 32) as u32,
                gid: lo as u32,
            },
            F_UNIX => Peer::Unix,
            _ => Peer::Unknown,
        }
    }
}

/// A service's id in the slots: FNV-1a of its name (never 0), the same in
/// every generation, so that `max_connections_per_ip` counts the old
/// generation's connections during a reload too.
pub fn service_id(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

impl Scoreboard {
    /// Maps the table and draws the address hash's secret. Call in the
    /// master before the first fork.
    pub fn new() -> std::io::Result<Scoreboard> {
        let words = crate::sys::shared_atomics(TOTAL)?;
        let secret = std::hash::RandomState::new();
        words[H_SEED].store(secret.hash_one(0u8), Ordering::Relaxed);
        words[H_SEED + 1].store(secret.hash_one(1u8), Ordering::Relaxed);
        Ok(Scoreboard {
            table: Table(words),
            free: (0..CAPACITY).rev().collect(),
            free_entries: vec![(0, ENTRY_CAPACITY)],
        })
    }

    /// Takes a free slot for a worker about to be forked and clears it
    /// (no service, no connection entries, no address table).
    pub fn claim(&mut self) -> Option<usize> {
        self.claim_worker(0, 0, 0, 0)
    }

    /// Takes a free slot for a worker of `service` (see [`service_id`]) and
    /// `generation`, and gives it, where the region has room, `entries`
    /// connection entries (check with [`Scoreboard::entries`]) and an
    /// address table for `ip_capacity` connections at once (0: none; check
    /// with [`Scoreboard::has_ip_table`]).
    pub fn claim_worker(
        &mut self,
        service: u64,
        generation: u64,
        entries: usize,
        ip_capacity: usize,
    ) -> Option<usize> {
        let i = self.free.pop()?;
        let (at, n) = self.alloc_entries(entries).unwrap_or((0, 0));
        let buckets = buckets_for(ip_capacity);
        let ip = self.alloc_entries(buckets * 2 / ENTRY_WORDS);
        let w = self.table.slot(i);
        for word in w {
            word.store(0, Ordering::Relaxed);
        }
        for word in self.table.blocks(at, n) {
            word.store(0, Ordering::Relaxed);
        }
        if let Some((ip_at, ip_n)) = ip {
            for word in self.table.blocks(ip_at, ip_n) {
                word.store(0, Ordering::Relaxed);
            }
            w[W_IP_AT].store(ip_at as u64, Ordering::Relaxed);
            w[W_IP_BUCKETS].store(buckets as u64, Ordering::Relaxed);
        }
        w[W_GENERATION].store(generation, Ordering::Relaxed);
        w[W_STARTED].store(crate::sys::coarse_ms(), Ordering::Relaxed);
        w[W_ENTRY_AT].store(at as u64, Ordering::Relaxed);
        w[W_ENTRIES].store(n as u64, Ordering::Relaxed);
        // Last: a worker scanning for its service sees the slot with its
        // entries and table cleared.
        w[W_SERVICE].store(service, Ordering::SeqCst);
        let high = &self.table.0[H_HIGH];
        if (high.load(Ordering::Relaxed) as usize) < i + 1 {
            high.store((i + 1) as u64, Ordering::SeqCst);
        }
        Some(i)
    }

    /// Gives a dead worker's slot, its entries and its address table back.
    pub fn release(&mut self, i: usize) {
        let w = self.table.slot(i);
        // First: no count includes the dead worker's connections any more.
        w[W_SERVICE].store(0, Ordering::SeqCst);
        w[W_PID].store(0, Ordering::Relaxed);
        let range = self.table.range(i);
        for e in range.clone() {
            self.table.entry(e)[E_START].store(0, Ordering::Relaxed);
        }
        w[W_ENTRIES].store(0, Ordering::Relaxed);
        if !range.is_empty() {
            self.free_range(range.start, range.len());
        }
        if let Some(t) = self.table.ip(i) {
            w[W_IP_BUCKETS].store(0, Ordering::Relaxed);
            let at = w[W_IP_AT].load(Ordering::Relaxed) as usize;
            self.free_range(at, t.words.len() / ENTRY_WORDS);
        }
        self.free.push(i);
    }

    /// First fit.
    fn alloc_entries(&mut self, n: usize) -> Option<(usize, usize)> {
        if n == 0 {
            return None;
        }
        let k = self.free_entries.iter().position(|&(_, len)| len >= n)?;
        let (at, len) = self.free_entries[k];
        if len == n {
            self.free_entries.remove(k);
        } else {
            self.free_entries[k] = (at + n, len - n);
        }
        Some((at, n))
    }

    fn free_range(&mut self, at: usize, n: usize) {
        let k = self.free_entries.partition_point(|&(s, _)| s < at);
        self.free_entries.insert(k, (at, n));
        // Merge with the next, then with the previous.
        if k + 1 < self.free_entries.len() && at + n == self.free_entries[k + 1].0 {
            self.free_entries[k].1 += self.free_entries[k + 1].1;
            self.free_entries.remove(k + 1);
        }
        if k > 0 && self.free_entries[k - 1].0 + self.free_entries[k - 1].1 == at {
            self.free_entries[k - 1].1 += self.free_entries[k].1;
            self.free_entries.remove(k);
        }
    }

    /// Slot `i`, to hand to the worker forked for it.
    pub fn slot(&self, i: usize) -> Slot {
        Slot {
            table: self.table,
            index: i,
        }
    }

    /// How many connection entries slot `i` has.
    pub fn entries(&self, i: usize) -> usize {
        self.table.range(i).len()
    }

    /// Whether slot `i` got an address table (false: the worker's
    /// connections are not counted for `max_connections_per_ip`).
    pub fn has_ip_table(&self, i: usize) -> bool {
        self.table.ip(i).is_some()
    }

    /// The connection slot `i`'s event loop is running now, if any (see
    /// [`Slot::set_running`]).
    pub fn running(&self, i: usize) -> Option<Conn> {
        read_entry(&self.table.slot(i)[W_RUN..W_RUN + ENTRY_WORDS])
    }

    /// What slot `i`'s worker has written.
    pub fn read(&self, i: usize) -> Counters {
        let w = self.table.slot(i);
        let r = |k: usize| w[k].load(Ordering::Relaxed);
        Counters {
            pid: r(W_PID),
            served: r(W_SERVED),
            active: r(W_ACTIVE),
            generation: r(W_GENERATION),
            state: State::from_word(r(W_STATE)),
            heartbeat_ms: r(W_HEARTBEAT),
            bytes_in: r(W_BYTES_IN),
            bytes_out: r(W_BYTES_OUT),
            refused: r(W_REFUSED),
            full: r(W_FULL),
            started_ms: r(W_STARTED),
        }
    }

    /// The connections slot `i`'s worker is serving now, oldest first.
    pub fn connections(&self, i: usize) -> Vec<Conn> {
        let mut out: Vec<Conn> = self
            .table
            .range(i)
            .filter_map(|e| read_entry(self.table.entry(e)))
            .collect();
        out.sort_by_key(|c| c.start_ms);
        out
    }
}

/// Buckets per buffer of a table for `capacity` connections at once: the
/// power of two at least twice that, at least [`MIN_BUCKETS`]; 0 for no
/// table (or none that could ever fit).
fn buckets_for(capacity: usize) -> usize {
    match capacity {
        0 => 0,
        n => n
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .filter(|&b| b / 2 <= ENTRY_CAPACITY)
            .map_or(0, |b| b.max(MIN_BUCKETS)),
    }
}

/// An entry's connection, if it has one. The start is read before and
/// after the peer: an entry reused meanwhile is skipped (the old
/// connection is gone).
fn read_entry(w: &[AtomicU64]) -> Option<Conn> {
    let start = w[E_START].load(Ordering::Acquire);
    if start == 0 {
        return None;
    }
    let (hi, lo, meta) = (
        w[E_HI].load(Ordering::Relaxed),
        w[E_LO].load(Ordering::Relaxed),
        w[E_META].load(Ordering::Relaxed),
    );
    fence(Ordering::Acquire);
    if w[E_START].load(Ordering::Relaxed) != start {
        return None;
    }
    Some(Conn {
        start_ms: start,
        peer: Peer::decode(hi, lo, meta),
    })
}

impl Slot {
    fn words(&self) -> &'static [AtomicU64] {
        self.table.slot(self.index)
    }

    /// Marks the slot as this worker's (called once, after fork): starting,
    /// with a first heartbeat.
    pub fn attach(&self, pid: u32) {
        let w = self.words();
        w[W_HEARTBEAT].store(crate::sys::coarse_ms(), Ordering::Relaxed);
        w[W_STATE].store(State::Starting.word(), Ordering::Relaxed);
        w[W_PID].store(u64::from(pid), Ordering::Relaxed);
    }

    /// Records what the worker is doing.
    pub fn set_state(&self, state: State) {
        self.words()[W_STATE].store(state.word(), Ordering::Relaxed);
    }

    /// Records that the worker is alive now (`now_ms` from
    /// [`crate::sys::coarse_ms`]).
    pub fn heartbeat(&self, now_ms: u64) {
        self.words()[W_HEARTBEAT].store(now_ms, Ordering::Relaxed);
    }

    /// A connection or datagram begins.
    pub fn begin(&self) {
        self.words()[W_ACTIVE].fetch_add(1, Ordering::Relaxed);
    }

    /// It has been served.
    pub fn end(&self) {
        let w = self.words();
        w[W_ACTIVE].fetch_sub(1, Ordering::Relaxed);
        w[W_SERVED].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a connection's (or datagram's) bytes.
    pub fn add_bytes(&self, bytes_in: u64, bytes_out: u64) {
        let w = self.words();
        if bytes_in > 0 {
            w[W_BYTES_IN].fetch_add(bytes_in, Ordering::Relaxed);
        }
        if bytes_out > 0 {
            w[W_BYTES_OUT].fetch_add(bytes_out, Ordering::Relaxed);
        }
    }

    /// The fewest connections a live, ready sibling (another worker of
    /// this slot's service, heartbeat younger than `fresh_ms`) is serving
    /// now; None when there is none. One load per slot up to the highest
    /// claimed: the accept gate's balance (src/worker/gate.rs).
    pub fn least_loaded_sibling(&self, now_ms: u64, fresh_ms: u64) -> Option<u64> {
        let service = self.words()[W_SERVICE].load(Ordering::Relaxed);
        if service == 0 {
            return None;
        }
        let mut least: Option<u64> = None;
        for i in 0..self.table.high() {
            if i == self.index {
                continue;
            }
            let w = self.table.slot(i);
            if w[W_SERVICE].load(Ordering::Relaxed) != service
                || w[W_PID].load(Ordering::Relaxed) == 0
                || State::from_word(w[W_STATE].load(Ordering::Relaxed)) != State::Ready
                || now_ms.saturating_sub(w[W_HEARTBEAT].load(Ordering::Relaxed)) > fresh_ms
            {
                continue;
            }
            let active = w[W_ACTIVE].load(Ordering::Relaxed);
            least = Some(least.map_or(active, |l| l.min(active)));
        }
        least
    }

    /// A connection or datagram was refused.
    pub fn refused(&self) {
        self.words()[W_REFUSED].fetch_add(1, Ordering::Relaxed);
    }

    /// The event loop is at `worker_connections` and stops accepting.
    pub fn full(&self) {
        self.words()[W_FULL].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the connection whose code the event loop runs now (its
    /// start, coarse clock, and peer), or None between connections, for
    /// the heartbeat check to name. Four stores, the start last (Release);
    /// None is one store. A read while the loop switches between two
    /// connections of the same start could mix their peers; the read that
    /// matters, of a loop blocked in one connection, is stable.
    pub fn set_running(&self, conn: Option<(u64, &Peer)>) {
        let run = Entry {
            words: &self.words()[W_RUN..W_RUN + ENTRY_WORDS],
        };
        match conn {
            Some((start_ms, peer)) => run.publish(start_ms, peer),
            None => run.clear(),
        }
    }

    /// Accept thread `thread`'s connection entry; None beyond the range the
    /// master gave (or if it gave none).
    pub fn entry(&self, thread: usize) -> Option<Entry> {
        let range = self.table.range(self.index);
        (thread < range.len()).then(|| Entry {
            words: self.table.entry(range.start + thread),
        })
    }

    /// This worker's address table writer: None if the slot has no table,
    /// or if one already exists (there is one writer per table; dropping
    /// it lets another be made).
    pub fn ip_counter(&self) -> Option<IpCounter> {
        let table = self.table.ip(self.index)?;
        let owned = &self.words()[W_IP_OWNED];
        owned
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        let buffer = table.buffer(table.flips.load(Ordering::Relaxed));
        let mut owner = Owner::default();
        for w in buffer {
            let w = w.load(Ordering::Relaxed);
            owner.used += usize::from(w != 0);
            owner.live += usize::from(w & COUNT_MAX != 0);
        }
        Some(IpCounter {
            slot: *self,
            table,
            owner: Mutex::new(owner),
        })
    }

    /// Connections from `ip` (canonical: IPv4-mapped taken as IPv4) held
    /// now by the live workers of this slot's service, every generation,
    /// as their address tables say. Locks nothing.
    pub fn count_ip(&self, ip: IpAddr) -> usize {
        self.count_ip_key(self.table.ip_key(ip))
    }

    fn count_ip_key(&self, key: u64) -> usize {
        match self.words()[W_SERVICE].load(Ordering::Relaxed) {
            0 => 0,
            service => self.table.count_key(service, key),
        }
    }
}

impl IpCounter {
    /// A connection from `ip` begins: counts it in this worker's table,
    /// then returns the connections from `ip` held by every live worker of
    /// the service, this one included. Call [`IpCounter::leave`] when it
    /// ends, whether or not it was refused.
    ///
    /// The count is stored (SeqCst) before the others are loaded (SeqCst):
    /// of two connections from one address entered at once by two workers,
    /// at least one sees the other, so both are never admitted over a
    /// limit.
    pub fn enter(&self, ip: IpAddr) -> usize {
        let key = self.slot.table.ip_key(ip);
        let uncounted = {
            let mut owner = self.lock();
            owner.insert(self.table, key);
            owner.overflow_of(key)
        };
        self.slot.count_ip_key(key) + uncounted
    }

    /// A connection from `ip` has ended.
    pub fn leave(&self, ip: IpAddr) {
        let key = self.slot.table.ip_key(ip);
        self.lock().remove(self.table, key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Owner> {
        // The lock guards no invariant a panic could break halfway: every
        // change is a single store or a rebuild that ends in a flip.
        self.owner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for IpCounter {
    fn drop(&mut self) {
        self.slot.words()[W_IP_OWNED].store(0, Ordering::Release);
    }
}

impl Owner {
    /// Counts one more connection of `key`: at its bucket, else at the
    /// first tombstone on its path, else at the empty word that ended it
    /// (rebuilding when 3/4 of the words are used), else here.
    fn insert(&mut self, t: IpTable, key: u64) {
        let buffer = t.buffer(t.flips.load(Ordering::Relaxed));
        match t.probe(buffer, key) {
            Probe::Found(at, w) if w & COUNT_MAX < COUNT_MAX => {
                buffer[at].store(w + 1, Ordering::SeqCst);
                self.live += usize::from(w & COUNT_MAX == 0);
            }
            Probe::Vacant {
                tombstone: Some(at),
                ..
            } => {
                buffer[at].store(key << COUNT_BITS | 1, Ordering::SeqCst);
                self.live += 1;
            }
            // One word stays empty, so that every probe ends early.
            Probe::Vacant {
                empty: Some(at), ..
            } if self.used + 1 < t.buckets => {
                buffer[at].store(key << COUNT_BITS | 1, Ordering::SeqCst);
                self.live += 1;
                self.used += 1;
                // Rebuild when a quarter of the words or more would come
                // back: never more often than every t.buckets / 8 inserts.
                if self.used * 4 > t.buckets * 3 && (self.used - self.live) * 8 >= t.buckets {
                    self.rebuild(t);
                }
            }
            _ => match self.overflow.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => self.overflow.push((key, 1)),
            },
        }
    }

    /// Counts one connection of `key` less (none counted: nothing).
    fn remove(&mut self, t: IpTable, key: u64) {
        if let Some(k) = self.overflow.iter().position(|&(o, _)| o == key) {
            self.overflow[k].1 -= 1;
            if self.overflow[k].1 == 0 {
                self.overflow.swap_remove(k);
            }
            return;
        }
        let buffer = t.buffer(t.flips.load(Ordering::Relaxed));
        if let Probe::Found(at, w) = t.probe(buffer, key)
            && w & COUNT_MAX > 0
        {
            // Down to 0: the key stays as a tombstone.
            buffer[at].store(w - 1, Ordering::SeqCst);
            self.live -= usize::from(w & COUNT_MAX == 1);
        }
    }

    /// The live keys, rebuilt without tombstones into the other buffer,
    /// which then becomes the one in use (SeqCst). The buffer in use is not
    /// written meanwhile, so readers keep reading it until the flip.
    fn rebuild(&mut self, t: IpTable) {
        let flips = t.flips.load(Ordering::Relaxed);
        let (old, new) = (t.buffer(flips), t.buffer(flips + 1));
        // A reader still in `new` from before the last flip must see that
        // flip if it sees a word cleared here (pairs with `count`'s fence).
        fence(Ordering::Release);
        for w in new {
            w.store(0, Ordering::Relaxed);
        }
        let mask = t.buckets - 1;
        let mut used = 0;
        for w in old {
            let w = w.load(Ordering::Relaxed);
            if w & COUNT_MAX == 0 {
                continue;
            }
            let mut at = (w >> COUNT_BITS) as usize & mask;
            while new[at].load(Ordering::Relaxed) != 0 {
                at = (at + 1) & mask;
            }
            new[at].store(w, Ordering::Relaxed);
            used += 1;
        }
        t.flips.store(flips + 1, Ordering::SeqCst);
        self.used = used;
        self.live = used;
    }

    /// Connections of `key` counted here instead of in the table.
    fn overflow_of(&self, key: u64) -> usize {
        self.overflow
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |&(_, n)| n)
    }
}

impl Entry {
    /// A connection from `peer` begins at `now_ms` (coarse clock). The
    /// peer first, the start last (Release): a reader that sees the start
    /// sees the peer.
    pub fn publish(&self, now_ms: u64, peer: &Peer) {
        let (hi, lo, meta) = peer.encode();
        self.words[E_HI].store(hi, Ordering::Relaxed);
        self.words[E_LO].store(lo, Ordering::Relaxed);
        self.words[E_META].store(meta, Ordering::Relaxed);
        self.words[E_START].store(now_ms.max(1), Ordering::Release);
    }

    /// The connection has ended.
    pub fn clear(&self) {
        self.words[E_START].store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pid: u64, served: u64, active: u64, c: Counters) -> bool {
        (c.pid, c.served, c.active) == (pid, served, active)
    }

    #[test]
    fn slots_are_cleared_claimed_and_released() {
        let mut board = Scoreboard::new().unwrap();
        let a = board.claim().unwrap();
        let b = board.claim().unwrap();
        assert_ne!(a, b);
        let s = board.slot(a);
        s.attach(42);
        s.begin();
        assert!(counts(42, 0, 1, board.read(a)), "{:?}", board.read(a));
        assert_eq!(board.read(a).state, State::Starting);
        s.end();
        s.begin();
        s.end();
        s.add_bytes(10, 20);
        s.refused();
        let c = board.read(a);
        assert!(counts(42, 2, 0, c), "{c:?}");
        assert_eq!((c.bytes_in, c.bytes_out, c.refused), (10, 20, 1));
        assert!(counts(0, 0, 0, board.read(b)));
        board.release(a);
        let c = board.claim().unwrap();
        assert_eq!(c, a, "a released slot is reused");
        let fresh = board.read(c);
        assert!(counts(0, 0, 0, fresh));
        assert_eq!((fresh.bytes_in, fresh.refused), (0, 0));
        assert_eq!(fresh.state, State::None);
    }

    #[test]
    fn a_forked_child_writes_what_the_parent_reads() {
        let mut board = Scoreboard::new().unwrap();
        let i = board.claim_worker(service_id("echo"), 3, 2, 0).unwrap();
        let slot = board.slot(i);
        // A plain fork in a test thread: the child only touches atomics and
        // _exits.
        match crate::sys::fork().unwrap() {
            crate::sys::Forked::Child => {
                slot.begin();
                slot.end();
                slot.heartbeat(1234);
                slot.set_state(State::Ready);
                let peer = Peer::inet("10.1.2.3:4000".parse().unwrap());
                slot.entry(1).unwrap().publish(99, &peer);
                crate::sys::exit_now(0);
            }
            crate::sys::Forked::Parent(pid) => {
                nix::sys::wait::waitpid(pid, None).unwrap();
            }
        }
        let c = board.read(i);
        assert_eq!((c.served, c.heartbeat_ms, c.generation), (1, 1234, 3));
        assert_eq!(c.state, State::Ready);
        assert_eq!(
            board.connections(i),
            vec![Conn {
                start_ms: 99,
                peer: Peer::Inet("10.1.2.3:4000".parse().unwrap())
            }]
        );
    }

    #[test]
    fn peers_round_trip_and_mapped_addresses_are_ipv4() {
        for p in [
            Peer::Inet("127.0.0.1:80".parse().unwrap()),
            Peer::Inet("[2001:db8::1]:65535".parse().unwrap()),
            Peer::UnixCred {
                pid: 7,
                uid: 65534,
                gid: 100,
            },
            Peer::Unix,
            Peer::Unknown,
        ] {
            let (hi, lo, meta) = p.encode();
            assert_eq!(Peer::decode(hi, lo, meta), p);
        }
        let mapped = Peer::inet("[::ffff:10.0.0.1]:5".parse().unwrap());
        assert_eq!(mapped, Peer::Inet("10.0.0.1:5".parse().unwrap()));
        assert_eq!(mapped.to_string(), "10.0.0.1:5");
    }

    #[test]
    fn entries_are_handed_out_first_fit_and_merged_back() {
        let mut board = Scoreboard::new().unwrap();
        let a = board.claim_worker(1, 1, 4, 0).unwrap();
        let b = board.claim_worker(1, 1, 1024, 0).unwrap();
        let c = board.claim_worker(1, 1, 4, 0).unwrap();
        assert_eq!(
            (board.entries(a), board.entries(b), board.entries(c)),
            (4, 1024, 4)
        );
        assert!(board.slot(a).entry(3).is_some());
        assert!(board.slot(a).entry(4).is_none(), "beyond its threads");
        board.release(b);
        // The hole left by b is reused before the tail.
        let d = board.claim_worker(1, 1, 10, 0).unwrap();
        assert_eq!(board.table.range(d).start, 4);
        board.release(a);
        board.release(c);
        board.release(d);
        assert_eq!(board.free_entries, vec![(0, ENTRY_CAPACITY)]);
        let none = board.claim_worker(1, 1, ENTRY_CAPACITY + 1, 0).unwrap();
        assert_eq!(board.entries(none), 0, "no range that large: none");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Slot `i`'s address table range of the region (start, blocks).
    fn ip_range(board: &Scoreboard, i: usize) -> Option<(usize, usize)> {
        let t = board.table.ip(i)?;
        let at = board.table.slot(i)[W_IP_AT].load(Ordering::Relaxed) as usize;
        Some((at, t.words.len() / ENTRY_WORDS))
    }

    /// Words probed to find `key` in the buffer in use.
    fn probe_len(t: IpTable, key: u64) -> usize {
        let buffer = t.buffer(t.flips.load(Ordering::Relaxed));
        match t.probe(buffer, key) {
            Probe::Found(at, _) => (at.wrapping_sub(key as usize) & (t.buckets - 1)) + 1,
            Probe::Vacant { .. } => panic!("key {key:#x} not in the table"),
        }
    }

    #[test]
    fn enter_and_leave_count_across_the_workers_of_one_service_only() {
        let mut board = Scoreboard::new().unwrap();
        let echo = service_id("echo");
        let a = board.claim_worker(echo, 1, 2, 8).unwrap();
        let b = board.claim_worker(echo, 2, 1, 8).unwrap();
        let other = board.claim_worker(service_id("other"), 1, 1, 8).unwrap();
        let none = board.claim_worker(echo, 2, 1, 0).unwrap();
        assert!(board.has_ip_table(a) && !board.has_ip_table(none));
        assert!(board.slot(none).ip_counter().is_none(), "no table");
        let (ca, cb) = (
            board.slot(a).ip_counter().unwrap(),
            board.slot(b).ip_counter().unwrap(),
        );
        let co = board.slot(other).ip_counter().unwrap();
        assert!(board.slot(a).ip_counter().is_none(), "one writer per table");
        assert_eq!(ca.enter(ip("127.0.0.1")), 1);
        assert_eq!(cb.enter(ip("127.0.0.1")), 2, "across generations");
        assert_eq!(co.enter(ip("127.0.0.1")), 1, "another service");
        assert_eq!(ca.enter(ip("127.0.0.2")), 1);
        assert_eq!(cb.enter(ip("::ffff:127.0.0.1")), 3, "mapped is IPv4");
        assert_eq!(board.slot(none).count_ip(ip("127.0.0.1")), 3);
        assert_eq!(board.slot(a).count_ip(ip("::1")), 0);
        assert_eq!(ca.enter(ip("::1")), 1);
        ca.leave(ip("127.0.0.1"));
        ca.leave(ip("127.0.0.1")); // not counted any more: nothing
        assert_eq!(board.slot(a).count_ip(ip("127.0.0.1")), 2);
        drop(cb);
        assert_eq!(
            board.slot(a).count_ip(ip("127.0.0.1")),
            2,
            "counts outlive the writer"
        );
        board.release(b);
        assert_eq!(
            board.slot(a).count_ip(ip("127.0.0.1")),
            0,
            "a dead worker's counts"
        );
        assert_eq!(board.slot(other).count_ip(ip("127.0.0.1")), 1);
        let again = board.claim_worker(echo, 3, 1, 8).unwrap();
        assert_eq!(again, b, "the slot is reused");
        let c = board
            .slot(again)
            .ip_counter()
            .expect("a fresh table, its old writer gone");
        assert_eq!(c.enter(ip("127.0.0.1")), 1, "with its old counts cleared");
        drop(ca);
        assert!(
            board.slot(a).ip_counter().is_some(),
            "a dropped writer can be replaced"
        );
    }

    #[test]
    fn a_forked_child_enters_what_the_parent_counts() {
        let mut board = Scoreboard::new().unwrap();
        let echo = service_id("echo");
        let child_slot = board.claim_worker(echo, 1, 1, 4).unwrap();
        let child_slot = board.slot(child_slot);
        let mine = board.claim_worker(echo, 1, 1, 4).unwrap();
        let mine = board.slot(mine);
        match crate::sys::fork().unwrap() {
            crate::sys::Forked::Child => {
                // Atomics and a lock made here: nothing the parent held.
                let code = match child_slot.ip_counter() {
                    Some(c) => {
                        c.enter(ip("10.1.2.3"));
                        c.enter(ip("::ffff:10.1.2.3"));
                        0
                    }
                    None => 1,
                };
                crate::sys::exit_now(code);
            }
            crate::sys::Forked::Parent(pid) => {
                let status = nix::sys::wait::waitpid(pid, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
            }
        }
        assert_eq!(mine.count_ip(ip("10.1.2.3")), 2);
        assert_eq!(mine.ip_counter().unwrap().enter(ip("10.1.2.3")), 3);
    }

    #[test]
    fn tombstones_are_reused_and_a_key_is_never_in_two_buckets() {
        let mut board = Scoreboard::new().unwrap();
        let i = board.claim_worker(1, 1, 0, 1).unwrap();
        let t = board.table.ip(i).unwrap();
        assert_eq!(t.buckets, MIN_BUCKETS);
        let counter = board.slot(i).ip_counter().unwrap();
        let mut owner = counter.lock();
        // Three keys with one home (5): they probe 5, 6, 7.
        let (k1, k2, k3) = (5, 5 + 16, 5 + 32);
        let buffer = t.buffer(0);
        let word = |at: usize| buffer[at].load(Ordering::Relaxed);
        owner.insert(t, k1);
        owner.insert(t, k2);
        assert_eq!(
            (word(5), word(6)),
            (k1 << COUNT_BITS | 1, k2 << COUNT_BITS | 1)
        );
        owner.remove(t, k1);
        assert_eq!(word(5), k1 << COUNT_BITS, "a tombstone");
        assert_eq!((owner.used, owner.live), (2, 1));
        assert_eq!(t.count(k2), 1, "found past the tombstone");
        assert_eq!(t.count(k1), 0);
        owner.insert(t, k3);
        assert_eq!(word(5), k3 << COUNT_BITS | 1, "the tombstone is reused");
        assert_eq!((owner.used, owner.live), (2, 2));
        owner.remove(t, k2);
        owner.insert(t, k2);
        assert_eq!(word(6), k2 << COUNT_BITS | 1, "back in its own tombstone");
        assert_eq!(word(7), 0, "not in a second bucket");
        owner.insert(t, k1);
        assert_eq!(word(7), k1 << COUNT_BITS | 1);
        assert_eq!((owner.used, owner.live), (3, 3));
        assert!(owner.overflow.is_empty());
    }

    #[test]
    fn rebuilds_under_churn_keep_counts_exact_and_probes_short() {
        let mut board = Scoreboard::new().unwrap();
        let cap = 64;
        let i = board.claim_worker(1, 1, 0, cap).unwrap();
        let t = board.table.ip(i).unwrap();
        assert_eq!(t.buckets, 128);
        let slot = board.slot(i);
        let counter = slot.ip_counter().unwrap();
        let mut held: std::collections::VecDeque<IpAddr> = Default::default();
        let mut model: std::collections::HashMap<IpAddr, usize> = Default::default();
        let mut worst = 0;
        for n in 0..100_000u32 {
            let addr = match n % 2 {
                0 => IpAddr::V4(n.into()),
                _ => IpAddr::V6((u128::from(n) << 64 | 0x2001).into()),
            };
            // 1 to 3 connections each, never more than `cap` at once.
            for _ in 0..=n % 3 {
                if held.len() == cap {
                    let gone = held.pop_front().unwrap();
                    counter.leave(gone);
                    *model.get_mut(&gone).unwrap() -= 1;
                }
                let want = model.entry(addr).or_default();
                *want += 1;
                assert_eq!(counter.enter(addr), *want, "{addr} after {n} addresses");
                held.push_back(addr);
            }
            let owner = counter.lock();
            assert!(owner.used * 4 <= t.buckets * 3, "3/4 full: {owner:?}");
            assert!(owner.overflow.is_empty(), "the table filled: {owner:?}");
            drop(owner);
            if n % 1000 == 0 {
                model.retain(|_, c| *c > 0);
                let mut total = 0;
                for (a, c) in &model {
                    assert_eq!(slot.count_ip(*a), *c, "{a}");
                    let len = probe_len(t, slot.table.ip_key(*a));
                    worst = worst.max(len);
                    total += len;
                }
                assert!(
                    total <= 4 * model.len(),
                    "{total} probes for {} keys",
                    model.len()
                );
            }
        }
        assert!(worst <= 32, "a probe of {worst} words");
        let flips = t.flips.load(Ordering::Relaxed);
        assert!(flips > 500, "rebuilt {flips} times");
        for a in held {
            counter.leave(a);
        }
        assert_eq!(counter.lock().live, 0);
    }

    /// Two threads enter one address `rounds` times at once (released
    /// together by a spinning barrier, within nanoseconds of each other):
    /// returns the rounds in which neither saw the other.
    fn blind_rounds(a: &IpCounter, b: &IpCounter, rounds: usize) -> usize {
        let at = ip("192.0.2.7");
        let arrived = std::sync::atomic::AtomicUsize::new(0);
        // Both threads at step `k` (each arrives once per step).
        let step = |k: usize| {
            arrived.fetch_add(1, Ordering::SeqCst);
            let mut spins = 0u32;
            while arrived.load(Ordering::SeqCst) < 2 * k {
                spins += 1;
                if spins.is_multiple_of(4096) {
                    std::thread::yield_now(); // the other thread lost its core
                }
                std::hint::spin_loop();
            }
        };
        let run = |c: &IpCounter| {
            let mut seen = Vec::with_capacity(rounds);
            for r in 0..rounds {
                step(2 * r + 1);
                seen.push(c.enter(at));
                step(2 * r + 2);
                c.leave(at);
            }
            seen
        };
        let (sa, sb) = std::thread::scope(|s| {
            let ta = s.spawn(|| run(a));
            let tb = s.spawn(|| run(b));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        assert!(
            sa.iter().chain(&sb).all(|&n| (1..=2).contains(&n)),
            "{sa:?} {sb:?}"
        );
        sa.iter()
            .zip(&sb)
            .filter(|(x, y)| **x < 2 && **y < 2)
            .count()
    }

    #[test]
    fn two_entering_one_address_at_once_never_both_see_a_total_below_2() {
        let mut board = Scoreboard::new().unwrap();
        let a = board.claim_worker(7, 1, 0, 2).unwrap();
        let b = board.claim_worker(7, 1, 0, 2).unwrap();
        let (ca, cb) = (
            board.slot(a).ip_counter().unwrap(),
            board.slot(b).ip_counter().unwrap(),
        );
        assert_eq!(blind_rounds(&ca, &cb, 2000), 0, "two workers");
        assert_eq!(blind_rounds(&ca, &ca, 2000), 0, "two threads of one worker");
    }

    #[test]
    fn a_reader_never_counts_from_a_table_being_rebuilt() {
        let mut board = Scoreboard::new().unwrap();
        let writer = board.claim_worker(9, 1, 0, 1).unwrap();
        let writer = board.slot(writer);
        let counter = writer.ip_counter().unwrap();
        let t = board.table.ip(writer.index).unwrap();
        let held = ip("198.51.100.1");
        counter.enter(held);
        // The read `count_ip` does for each slot, without the hash.
        let key = board.table.ip_key(held);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (wrong, reads) = std::thread::scope(|s| {
            let r = s.spawn(|| {
                let (mut wrong, mut reads) = (0, 0u64);
                while !done.load(Ordering::Relaxed) {
                    wrong += usize::from(t.count(key) != 1);
                    reads += 1;
                }
                (wrong, reads)
            });
            // Rebuilds back to back: a reader that loads the flips just
            // before one and probes just after the next began would read
            // a cleared buffer.
            let mut owner = counter.lock();
            for _ in 0..300_000 {
                owner.rebuild(t);
            }
            drop(owner);
            done.store(true, Ordering::Relaxed);
            r.join().unwrap()
        });
        assert_eq!(t.flips.load(Ordering::Relaxed), 300_000);
        assert!(reads > 0);
        assert_eq!(wrong, 0, "{wrong} of {reads} reads were wrong");
    }

    #[test]
    fn full_and_running_round_trip_and_are_cleared_at_claim() {
        let mut board = Scoreboard::new().unwrap();
        let i = board.claim_worker(1, 1, 8, 0).unwrap();
        let s = board.slot(i);
        s.full();
        s.full();
        assert_eq!(board.read(i).full, 2);
        assert_eq!(board.running(i), None);
        let peer = Peer::inet("[::ffff:10.9.8.7]:4242".parse().unwrap());
        s.set_running(Some((77, &peer)));
        let want = Conn {
            start_ms: 77,
            peer: Peer::Inet("10.9.8.7:4242".parse().unwrap()),
        };
        assert_eq!(board.running(i), Some(want));
        let unix = Peer::UnixCred {
            pid: 1,
            uid: 2,
            gid: 3,
        };
        s.set_running(Some((78, &unix)));
        assert_eq!(
            board.running(i).map(|c| (c.start_ms, c.peer)),
            Some((78, unix))
        );
        s.set_running(None);
        assert_eq!(board.running(i), None);
        s.set_running(Some((79, &peer)));
        board.release(i);
        let j = board.claim().unwrap();
        assert_eq!(j, i);
        assert_eq!((board.read(j).full, board.running(j)), (0, None));
    }

    #[test]
    fn entries_and_tables_are_handed_out_disjoint_and_merged_back() {
        let mut board = Scoreboard::new().unwrap();
        let a = board.claim_worker(1, 1, 4, 8).unwrap();
        let b = board.claim_worker(1, 1, 1024, 1024).unwrap();
        let c = board.claim_worker(1, 1, 0, 100).unwrap();
        let d = board.claim_worker(1, 1, 8, 10_000).unwrap();
        assert_eq!(ip_range(&board, a).unwrap().1, 8, "16 buckets, twice");
        assert_eq!(ip_range(&board, b).unwrap().1, 1024);
        assert_eq!(ip_range(&board, c).unwrap().1, 128);
        assert_eq!(ip_range(&board, d).unwrap().1, 16_384);
        let mut ranges = Vec::new();
        for i in [a, b, c, d] {
            let e = board.table.range(i);
            if !e.is_empty() {
                ranges.push((e.start, e.len()));
            }
            ranges.extend(ip_range(&board, i));
        }
        ranges.sort();
        assert_eq!(ranges.len(), 7);
        for w in ranges.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlap: {ranges:?}");
        }
        board.release(b);
        // b's 2048 blocks are reused before the tail.
        let e = board.claim_worker(1, 1, 16, 500).unwrap();
        assert!(board.table.range(e).start < 2048 && ip_range(&board, e).unwrap().0 < 2048);
        let huge = board.claim_worker(1, 1, 8, ENTRY_CAPACITY).unwrap();
        assert!(!board.has_ip_table(huge), "no room that large: none");
        assert_eq!(board.entries(huge), 8, "its entries all the same");
        for i in [a, c, d, e, huge] {
            board.release(i);
        }
        assert_eq!(board.free_entries, vec![(0, ENTRY_CAPACITY)]);
        let whole = board.claim_worker(1, 1, 0, ENTRY_CAPACITY).unwrap();
        assert_eq!(
            ip_range(&board, whole),
            Some((0, ENTRY_CAPACITY)),
            "the whole region"
        );
        board.release(whole);
        let beyond = board.claim_worker(1, 1, 0, ENTRY_CAPACITY + 1).unwrap();
        assert!(!board.has_ip_table(beyond), "more than could ever fit");
        board.release(beyond);
        assert_eq!(board.free_entries, vec![(0, ENTRY_CAPACITY)]);
    }

    #[test]
    fn service_ids_are_stable_and_never_zero() {
        assert_eq!(service_id("echo"), service_id("echo"));
        assert_ne!(service_id("echo"), service_id("echo2"));
        assert_ne!(service_id(""), 0);
    }
}
