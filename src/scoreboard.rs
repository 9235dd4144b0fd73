//! The scoreboard: one slot per worker, in memory the master maps (shared,
//! anonymous) before it forks anything. A worker writes only its own slot
//! and its own connection entries, with atomic stores; the master reads
//! every slot for `preforkd status` and for the stuck-worker check, and a
//! worker reads the entries of its service's other workers to count the
//! connections of one client address (`max_connections_per_ip`). Nothing
//! touches the disk.
//!
//! Layout (all `AtomicU64` words): a header (`H_HIGH`: one past the
//! highest slot ever claimed, so that scans stay short), [`CAPACITY`] slots
//! of `WORDS` words (see the `W_*` offsets), then a region of connection
//! entries of `ENTRY_WORDS` words. Each worker is given, when its slot is
//! claimed, a contiguous range of entries, one per accept thread: the
//! connection that thread is serving (its start, on the coarse monotonic
//! clock, and its peer). The master hands ranges out first-fit from a free
//! list, so a pool of 1-thread workers does not reserve 1024 entries each.
//!
//! Hot path cost, per connection: one read of the coarse clock (vDSO, no
//! syscall), four stores to publish the entry (the last one SeqCst), one
//! store to clear it, and a few relaxed adds (active, served, bytes).
//!
//! Owns: the mapping (for the life of the process) and, in the master, the
//! lists of free slots and free entries.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

/// Header words.
const HEADER: usize = 8;
/// One past the highest slot index ever claimed (scans stop there).
const H_HIGH: usize = 0;

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
/// First entry of the worker's range.
const W_ENTRY_AT: usize = 11;
/// Entries in the range (its accept threads; 0: none).
const W_ENTRIES: usize = 12;
const W_FULL: usize = 13;
const W_RUN_START: usize = 14;
const W_RUN_HI: usize = 15;
const W_RUN_LO: usize = 16;
const W_RUN_META: usize = 17;

/// Slots in one master's scoreboard: twice the largest pool the config
/// allows (4096) with room for a reload's second generation of several
/// services. A worker started when every slot is taken runs without one
/// (status then shows no counters for it).
pub const CAPACITY: usize = 16384;

/// Words per connection entry: see the `E_*` offsets.
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

/// Connection entries in one scoreboard: 64 per slot on average (a pool of
/// 64 workers of 1024 threads, or 16384 workers of 16). A worker for which
/// no range is left serves without entries (its connections are neither in
/// status nor counted by `max_connections_per_ip`, and the master logs it).
pub const ENTRY_CAPACITY: usize = 262_144;

const ENTRIES_AT: usize = HEADER + CAPACITY * WORDS;
const TOTAL: usize = ENTRIES_AT + ENTRY_CAPACITY * ENTRY_WORDS;

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

/// The mapping: header, slots, entries.
#[derive(Clone, Copy)]
struct Table(&'static [AtomicU64]);

impl Table {
    fn slot(self, i: usize) -> &'static [AtomicU64] {
        &self.0[HEADER + i * WORDS..HEADER + (i + 1) * WORDS]
    }

    fn entry(self, e: usize) -> &'static [AtomicU64] {
        let at = ENTRIES_AT + e * ENTRY_WORDS;
        &self.0[at..at + ENTRY_WORDS]
    }

    /// Slot `i`'s entry range.
    fn range(self, i: usize) -> std::ops::Range<usize> {
        let w = self.slot(i);
        let at = w[W_ENTRY_AT].load(Ordering::Relaxed) as usize;
        let n = w[W_ENTRIES].load(Ordering::Relaxed) as usize;
        let at = at.min(ENTRY_CAPACITY);
        at..(at + n).min(ENTRY_CAPACITY)
    }

    fn high(self) -> usize {
        (self.0[H_HIGH].load(Ordering::SeqCst) as usize).min(CAPACITY)
    }
}

/// The whole table, as the master holds it.
pub struct Scoreboard {
    table: Table,
    free: Vec<usize>,
    /// Free entry ranges (start, len), sorted by start, never adjacent.
    free_entries: Vec<(usize, usize)>,
}

/// A worker's view of its own slot (and, to count peers, of the others').
#[derive(Clone, Copy)]
pub struct Slot {
    table: Table,
    index: usize,
}

/// TEMP
pub struct IpCounter {
    slot: Slot,
    n: std::sync::Arc<std::sync::Mutex<Vec<IpAddr>>>,
}
impl IpCounter {
    /// TEMP
    pub fn enter(&self, ip: IpAddr) -> usize {
        let mut v = self.n.lock().unwrap();
        v.push(ip);
        let _ = self.slot;
        v.iter().filter(|x| **x == ip).count()
    }
    /// TEMP
    pub fn leave(&self, ip: IpAddr) {
        let mut v = self.n.lock().unwrap();
        if let Some(i) = v.iter().position(|x| *x == ip) {
            v.swap_remove(i);
        }
    }
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
    /// TEMP
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
    /// Maps the table. Call in the master before the first fork.
    pub fn new() -> std::io::Result<Scoreboard> {
        let words = crate::sys::shared_atomics(TOTAL)?;
        Ok(Scoreboard {
            table: Table(words),
            free: (0..CAPACITY).rev().collect(),
            free_entries: vec![(0, ENTRY_CAPACITY)],
        })
    }

    /// Takes a free slot for a worker about to be forked and clears it
    /// (no service, no connection entries).
    pub fn claim(&mut self) -> Option<usize> {
        self.claim_worker(0, 0, 0, 0)
    }

    /// Takes a free slot for a worker of `service` (see [`service_id`]) and
    /// `generation` with `threads` accept threads, and gives it a range of
    /// `threads` connection entries if one is free (check with
    /// [`Scoreboard::entries`]).
    pub fn claim_worker(
        &mut self,
        service: u64,
        generation: u64,
        threads: usize,
        _ip: usize,
    ) -> Option<usize> {
        let i = self.free.pop()?;
        let range = self.alloc_entries(threads);
        let w = self.table.slot(i);
        for word in w {
            word.store(0, Ordering::Relaxed);
        }
        let (at, n) = range.unwrap_or((0, 0));
        for e in at..at + n {
            for word in self.table.entry(e) {
                word.store(0, Ordering::Relaxed);
            }
        }
        w[W_GENERATION].store(generation, Ordering::Relaxed);
        w[W_STARTED].store(crate::sys::coarse_ms(), Ordering::Relaxed);
        w[W_ENTRY_AT].store(at as u64, Ordering::Relaxed);
        w[W_ENTRIES].store(n as u64, Ordering::Relaxed);
        // Last: a worker scanning for its service sees the slot with its
        // entries cleared.
        w[W_SERVICE].store(service, Ordering::SeqCst);
        let high = &self.table.0[H_HIGH];
        if (high.load(Ordering::Relaxed) as usize) < i + 1 {
            high.store((i + 1) as u64, Ordering::SeqCst);
        }
        Some(i)
    }

    /// Gives a dead worker's slot (and its entries) back.
    pub fn release(&mut self, i: usize) {
        let w = self.table.slot(i);
        // First: no scan counts the dead worker's connections any more.
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

    /// TEMP
    pub fn has_ip_table(&self, _i: usize) -> bool {
        true
    }
    /// TEMP
    pub fn running(&self, i: usize) -> Option<Conn> {
        let w = self.table.slot(i);
        let start = w[W_RUN_START].load(Ordering::Acquire);
        if start == 0 {
            return None;
        }
        Some(Conn {
            start_ms: start,
            peer: Peer::decode(
                w[W_RUN_HI].load(Ordering::Relaxed),
                w[W_RUN_LO].load(Ordering::Relaxed),
                w[W_RUN_META].load(Ordering::Relaxed),
            ),
        })
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
            started_ms: r(W_STARTED),
            full: r(W_FULL),
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
    std::sync::atomic::fence(Ordering::Acquire);
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

    /// TEMP
    pub fn full(&self) {
        self.words()[W_FULL].fetch_add(1, Ordering::Relaxed);
    }
    /// TEMP
    pub fn set_running(&self, conn: Option<(u64, &Peer)>) {
        let w = self.words();
        match conn {
            None => w[W_RUN_START].store(0, Ordering::Release),
            Some((start, peer)) => {
                let (hi, lo, meta) = peer.encode();
                w[W_RUN_HI].store(hi, Ordering::Relaxed);
                w[W_RUN_LO].store(lo, Ordering::Relaxed);
                w[W_RUN_META].store(meta, Ordering::Relaxed);
                w[W_RUN_START].store(start.max(1), Ordering::Release);
            }
        }
    }
    /// TEMP
    pub fn ip_counter(&self) -> Option<IpCounter> {
        Some(IpCounter {
            slot: *self,
            n: std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
        })
    }

    /// A connection or datagram was refused.
    pub fn refused(&self) {
        self.words()[W_REFUSED].fetch_add(1, Ordering::Relaxed);
    }

    /// Accept thread `thread`'s connection entry; None beyond the range the
    /// master gave (or if it gave none).
    pub fn entry(&self, thread: usize) -> Option<Entry> {
        let range = self.table.range(self.index);
        (thread < range.len()).then(|| Entry {
            words: self.table.entry(range.start + thread),
        })
    }

    /// Connections from `ip` (canonical: IPv4-mapped taken as IPv4) being
    /// served now by the live workers of this slot's service, this one's
    /// published entries included.
    pub fn count_ip(&self, ip: IpAddr) -> usize {
        let service = self.words()[W_SERVICE].load(Ordering::Relaxed);
        if service == 0 {
            return 0;
        }
        let (hi, lo, meta) = Peer::inet(SocketAddr::new(ip, 0)).encode();
        let family = meta & 0xff;
        let mut n = 0;
        for i in 0..self.table.high() {
            let w = self.table.slot(i);
            if w[W_SERVICE].load(Ordering::SeqCst) != service {
                continue;
            }
            for e in self.table.range(i) {
                let ew = self.table.entry(e);
                // SeqCst, as the store in `publish`: of two connections
                // published at once, each sees the other's entry.
                if ew[E_START].load(Ordering::SeqCst) != 0
                    && ew[E_META].load(Ordering::Relaxed) & 0xff == family
                    && ew[E_HI].load(Ordering::Relaxed) == hi
                    && ew[E_LO].load(Ordering::Relaxed) == lo
                {
                    n += 1;
                }
            }
        }
        n
    }
}

impl Entry {
    /// A connection from `peer` begins at `now_ms` (coarse clock). The
    /// peer first, the start last (SeqCst): a reader that sees the start
    /// sees the peer.
    pub fn publish(&self, now_ms: u64, peer: &Peer) {
        let (hi, lo, meta) = peer.encode();
        self.words[E_HI].store(hi, Ordering::Relaxed);
        self.words[E_LO].store(lo, Ordering::Relaxed);
        self.words[E_META].store(meta, Ordering::Relaxed);
        self.words[E_START].store(now_ms.max(1), Ordering::SeqCst);
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

    #[test]
    fn count_ip_counts_live_connections_of_the_same_service_only() {
        let mut board = Scoreboard::new().unwrap();
        let echo = service_id("echo");
        let a = board.claim_worker(echo, 1, 2, 0).unwrap();
        let b = board.claim_worker(echo, 2, 1, 0).unwrap();
        let other = board.claim_worker(service_id("other"), 1, 1, 0).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let peer = |s: &str| Peer::inet(s.parse().unwrap());
        board
            .slot(a)
            .entry(0)
            .unwrap()
            .publish(5, &peer("127.0.0.1:1000"));
        board
            .slot(a)
            .entry(1)
            .unwrap()
            .publish(5, &peer("127.0.0.2:1000"));
        board
            .slot(b)
            .entry(0)
            .unwrap()
            .publish(5, &peer("[::ffff:127.0.0.1]:1"));
        board
            .slot(other)
            .entry(0)
            .unwrap()
            .publish(5, &peer("127.0.0.1:9"));
        assert_eq!(board.slot(a).count_ip(ip), 2, "across generations");
        assert_eq!(board.slot(other).count_ip(ip), 1);
        assert_eq!(board.slot(a).count_ip("::1".parse().unwrap()), 0);
        board.slot(a).entry(0).unwrap().clear();
        assert_eq!(board.slot(b).count_ip(ip), 1);
        board.release(b);
        assert_eq!(board.slot(a).count_ip(ip), 0, "a dead worker's entries");
    }

    #[test]
    fn service_ids_are_stable_and_never_zero() {
        assert_eq!(service_id("echo"), service_id("echo"));
        assert_ne!(service_id("echo"), service_id("echo2"));
        assert_ne!(service_id(""), 0);
    }
}
