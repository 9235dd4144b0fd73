//! The PROXY protocol (HAProxy's; v1 is a text line, v2 a binary block):
//! a load balancer in front of preforkd opens each connection with a
//! header that says who the client is, and from then on that address is
//! the peer everywhere (`allow`/`deny`, `max_connections_per_ip`, the
//! scoreboard, the log, the exec program's `TCPREMOTEIP`, the Rust API's
//! [`peer_addr`](crate::handler::Connection::peer_addr)).
//!
//! The header is read in the worker, before the access rules and the
//! handler, from peers in `proxy_from` only (a Unix socket's peer is
//! trusted: its file's permissions say who may connect). It is consumed
//! exactly: not one byte of what follows it is read, so the handler gets
//! the client's data from the socket itself. Bounded: at most
//! [`MAX_HEADER`] bytes, within [`HEADER_TIMEOUT`]. Parsed by the `ppp`
//! crate, once the bytes of the whole header are in.
//!
//! A v2 `LOCAL` header (a balancer's own health check) and a v1
//! `UNKNOWN` one keep the socket's addresses.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use serde::{Deserialize, Serialize};

/// The longest header taken (v1's longest is 107 bytes; v2's is its 16
/// bytes and what they announce, TLVs included: a balancer that adds
/// certificates or long TLVs needs more than this).
pub const MAX_HEADER: usize = 2048;
/// How long a connection has to send its whole header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What every v1 header starts with.
const V1_SIG: &[u8; 6] = b"PROXY ";
/// v1's longest header, CRLF included.
const V1_MAX: usize = 107;

/// Which headers a service takes (`proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The text header only.
    V1,
    /// The binary header only.
    V2,
    /// Either, told apart by the first byte.
    Any,
}

impl Version {
    fn takes_v1(self) -> bool {
        matches!(self, Version::V1 | Version::Any)
    }
    fn takes_v2(self) -> bool {
        matches!(self, Version::V2 | Version::Any)
    }
}

/// A service's PROXY protocol settings, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Which headers.
    pub version: Version,
    /// The peers that may send a header (`proxy_from`).
    pub from: Vec<IpNet>,
}

/// The addresses a header gave: the client (`peer`) and where it
/// connected to (`local`, the balancer's front).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxied {
    /// TCP over IPv4 or IPv6.
    Inet {
        /// The client.
        peer: SocketAddr,
        /// The balancer's front.
        local: SocketAddr,
    },
    /// v2's Unix family: the paths, if named.
    Unix {
        /// The client's socket.
        peer: Option<PathBuf>,
        /// The balancer's.
        local: Option<PathBuf>,
    },
}

/// Why a connection was cut before its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// Its peer is not in `proxy_from`.
    Untrusted(IpAddr),
    /// Not a header this service takes, or a malformed one.
    Malformed(String),
    /// The whole header did not come within [`HEADER_TIMEOUT`].
    Slow,
    /// The peer closed (or reset) before the end of its header.
    Closed,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Untrusted(ip) => write!(f, "{ip} may not send a PROXY header (not in proxy_from)"),
            Cut::Malformed(why) => write!(f, "bad PROXY header: {why}"),
            Cut::Slow => write!(
                f,
                "no complete PROXY header within {}s",
                HEADER_TIMEOUT.as_secs()
            ),
            Cut::Closed => write!(f, "closed before the end of its PROXY header"),
        }
    }
}

impl Proxy {
    /// Whether the connection's own peer (its IP address; None for a
    /// Unix socket's) may send a header.
    pub fn trusts(&self, peer: Option<IpAddr>) -> Result<(), Cut> {
        match peer {
            None => Ok(()),
            Some(ip) => {
                let ip = ip.to_canonical();
                if self.from.iter().any(|n| n.contains(&ip)) {
                    Ok(())
                } else {
                    Err(Cut::Untrusted(ip))
                }
            }
        }
    }

    /// Reads the header on a connection in a worker's thread, waiting
    /// with poll(2) for the rest of it: None when it keeps the socket's
    /// addresses (LOCAL, UNKNOWN).
    pub fn read_blocking(&self, fd: BorrowedFd<'_>) -> Result<Option<Proxied>, Cut> {
        let deadline = Instant::now() + HEADER_TIMEOUT;
        let mut reader = Reader::default();
        loop {
            match reader.step(fd, self.version)? {
                Progress::Done(p) => return Ok(p),
                Progress::Wait => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Cut::Slow);
                    }
                    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                    let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
                    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(Cut::Malformed(format!("poll: {e}"))),
                    }
                }
            }
        }
    }

    /// The same in the event loop: waits for the socket through the
    /// loop's reactor, registered only while the header is incomplete
    /// (it has usually come whole with the connection).
    pub async fn read_async(&self, fd: BorrowedFd<'_>) -> Result<Option<Proxied>, Cut> {
        let mut reader = Reader::default();
        if let Progress::Done(p) = reader.step(fd, self.version)? {
            return Ok(p);
        }
        // SAFETY: `fd` is borrowed for all of this call, which the AsyncFd
        // does not outlive: the descriptor stays open and the same while
        // it is registered (and it is deregistered when dropped, before the
        // loop registers the connection for its handler).
        let watched = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                Watched(fd),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| Cut::Malformed(format!("cannot watch the connection: {e}")))?;
        let wait = async {
            loop {
                let mut ready = watched.readable().await.map_err(|_| Cut::Closed)?;
                match reader.step(fd, self.version)? {
                    Progress::Done(p) => return Ok(p),
                    Progress::Wait => ready.clear_ready(),
                }
            }
        };
        tokio::time::timeout(HEADER_TIMEOUT, wait)
            .await
            .unwrap_or(Err(Cut::Slow))
    }
}

/// A descriptor the loop watches while the header comes, without owning
/// it.
struct Watched<'a>(BorrowedFd<'a>);

impl AsRawFd for Watched<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

enum Progress {
    Done(Option<Proxied>),
    Wait,
}

/// The header's bytes so far, taken from the socket without going past
/// its end: each step peeks at what has come, works out how much of it
/// is surely header, and reads exactly that.
#[derive(Default)]
struct Reader {
    got: Vec<u8>,
}

impl Reader {
    fn step(&mut self, fd: BorrowedFd<'_>, version: Version) -> Result<Progress, Cut> {
        let mut peeked = [0u8; MAX_HEADER];
        let room = MAX_HEADER - self.got.len();
        let n = match recv(
            fd.as_raw_fd(),
            &mut peeked[..room],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => return Err(Cut::Closed),
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Progress::Wait),
            Err(_) => return Err(Cut::Closed),
        };
        let have = self.got.len();
        let mut all = std::mem::take(&mut self.got);
        all.extend_from_slice(&peeked[..n]);
        let (end, complete) = header_end(&all, version)?;
        let take = end - have;
        all.truncate(end);
        self.got = all;
        // Take the header's bytes out of the socket: they are there (just
        // peeked), so this does not wait.
        let mut sink = [0u8; MAX_HEADER];
        let mut taken = 0;
        while taken < take {
            match recv(
                fd.as_raw_fd(),
                &mut sink[..take - taken],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Err(Cut::Closed),
                Ok(k) => taken += k,
                Err(Errno::EINTR) => {}
                Err(_) => return Err(Cut::Closed),
            }
        }
        if !complete {
            return Ok(Progress::Wait);
        }
        parse(&self.got).map(Progress::Done)
    }
}

/// How many bytes of `all` are header, and whether that is all of it; an
/// error as soon as the bytes say it is not a header this service takes.
fn header_end(all: &[u8], version: Version) -> Result<(usize, bool), Cut> {
    let Some(&first) = all.first() else {
        return Ok((0, false));
    };
    let sig: &[u8] = match first {
        b'P' if version.takes_v1() => V1_SIG,
        b'\r' if version.takes_v2() => V2_SIG,
        _ => {
            let wanted = match version {
                Version::V1 => "v1",
                Version::V2 => "v2",
                Version::Any => "v1 or v2",
            };
            return Err(Cut::Malformed(format!(
                "the connection does not start with a PROXY protocol {wanted} header"
            )));
        }
    };
    let head = all.len().min(sig.len());
    if all[..head] != sig[..head] {
        return Err(Cut::Malformed(
            "the connection does not start with a PROXY protocol header".into(),
        ));
    }
    if sig == V1_SIG {
        return match all.windows(2).position(|w| w == b"\r\n") {
            Some(p) if p + 2 <= V1_MAX => Ok((p + 2, true)),
            None if all.len() < V1_MAX => Ok((all.len(), false)),
            _ => Err(Cut::Malformed(format!(
                "a v1 header longer than {V1_MAX} bytes"
            ))),
        };
    }
    if all.len() < 16 {
        return Ok((all.len(), false));
    }
    let total = 16 + u16::from_be_bytes([all[14], all[15]]) as usize;
    if total > MAX_HEADER {
        return Err(Cut::Malformed(format!(
            "a v2 header of {total} bytes, more than the {MAX_HEADER} taken"
        )));
    }
    Ok((all.len().min(total), all.len() >= total))
}

/// The addresses of a whole header (`bytes` is exactly the header).
fn parse(bytes: &[u8]) -> Result<Option<Proxied>, Cut> {
    // v1 and v2 share ppp's address types.
    let v4 = |a: ppp::v2::IPv4| {
        Some(Proxied::Inet {
            peer: (a.source_address, a.source_port).into(),
            local: (a.destination_address, a.destination_port).into(),
        })
    };
    let v6 = |a: ppp::v2::IPv6| {
        Some(Proxied::Inet {
            peer: (a.source_address, a.source_port).into(),
            local: (a.destination_address, a.destination_port).into(),
        })
    };
    if bytes.starts_with(V1_SIG) {
        use ppp::v1::Addresses;
        let h = ppp::v1::Header::try_from(bytes).map_err(|e| Cut::Malformed(format!("v1: {e}")))?;
        return Ok(match h.addresses {
            Addresses::Unknown => None,
            Addresses::Tcp4(a) => v4(a),
            Addresses::Tcp6(a) => v6(a),
        });
    }
    use ppp::v2::{Addresses, Command};
    let h = ppp::v2::Header::try_from(bytes).map_err(|e| Cut::Malformed(format!("v2: {e}")))?;
    if h.command == Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        Addresses::Unspecified => None,
        Addresses::IPv4(a) => v4(a),
        Addresses::IPv6(a) => v6(a),
        Addresses::Unix(u) => {
            let path = |raw: &[u8; 108]| {
                let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                use std::os::unix::ffi::OsStrExt;
                (len > 0).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&raw[..len])))
            };
            Some(Proxied::Unix {
                peer: path(&u.source),
                local: path(&u.destination),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn a_header_is_found_to_its_last_byte_and_no_further() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 80\r\nGET /";
        assert_eq!(header_end(&v1[..10], Version::Any), Ok((10, false)));
        assert_eq!(header_end(v1, Version::V1), Ok((43, true)));
        let h = v2(1, 0x11, &[192, 0, 2, 7, 198, 51, 100, 1, 0x12, 0x67, 0, 80]);
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"hello");
        assert_eq!(header_end(&h[..13], Version::V2), Ok((13, false)));
        assert_eq!(header_end(&with_data, Version::Any), Ok((28, true)));
    }

    #[test]
    fn the_wrong_version_or_garbage_is_cut_at_once() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 80\r\n";
        assert!(matches!(
            header_end(v1, Version::V2),
            Err(Cut::Malformed(m)) if m.contains("v2 header")
        ));
        assert!(header_end(b"GET / HTTP/1.0\r\n", Version::Any).is_err());
        assert!(header_end(b"PROXX", Version::V1).is_err());
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(header_end(&long, Version::V1).is_err());
        let mut big = v2(1, 0x11, &[]);
        big[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert!(header_end(&big, Version::V2).is_err());
    }

    #[test]
    fn headers_give_the_client_and_its_destination() {
        let p = parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 80\r\n").unwrap();
        assert_eq!(
            p,
            Some(Proxied::Inet {
                peer: "192.0.2.7:4711".parse().unwrap(),
                local: "198.51.100.1:80".parse().unwrap(),
            })
        );
        let h = v2(1, 0x11, &[192, 0, 2, 7, 198, 51, 100, 1, 0x12, 0x67, 0, 80]);
        assert_eq!(parse(&h).unwrap(), p);
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), None);
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap(), None, "LOCAL");
        assert!(parse(b"PROXY TCP4 192.0.2.300 198.51.100.1 4711 80\r\n").is_err());
    }

    #[test]
    fn only_proxy_from_may_send_a_header() {
        let p = Proxy {
            version: Version::Any,
            from: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(p.trusts(Some("10.1.2.3".parse().unwrap())).is_ok());
        assert!(p.trusts(Some("::ffff:10.1.2.3".parse().unwrap())).is_ok());
        assert_eq!(
            p.trusts(Some("192.0.2.1".parse().unwrap())),
            Err(Cut::Untrusted("192.0.2.1".parse().unwrap()))
        );
        assert!(p.trusts(None).is_ok());
    }
}
