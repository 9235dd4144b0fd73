//! `chargen` (RFC 864): sends the rotating 72-character lines of the 95
//! printable ASCII characters, each line starting one character further on.
//! On streams it sends until the client closes (input is thrown away) and
//! stops at once when asked to; a datagram gets one answer of 0 to 512 bytes.

use std::io;

use super::{
    AsyncConnection, AsyncStreamHandler, Connection, Datagram, DatagramHandler, PluginInfo, Sent,
    StreamHandler,
};

const LINE: usize = 72;
const PRINTABLE: usize = 95;

/// The RFC 864 pattern: `lines` lines of 72 characters and CR LF, starting
/// at line `first` of the 95-line cycle.
pub fn pattern(first: usize, lines: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines * (LINE + 2));
    for l in first..first + lines {
        for c in 0..LINE {
            out.push(b' ' + ((l + c) % PRINTABLE) as u8);
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct Chargen {
    /// One full cycle plus one line, so that any line's start is a slice.
    cycle: Vec<u8>,
}

impl StreamHandler for Chargen {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let cycle_len = PRINTABLE * (LINE + 2);
        let mut pos = 0;
        loop {
            // Throw input away as it comes, so the client can never fill our
            // receive buffer (which would make our close a reset).
            conn.discard_input()?;
            let end = (pos + 16 * 1024).min(self.cycle.len());
            match conn.send(&self.cycle[pos..end]) {
                Ok(Sent::Bytes(n)) => pos = (pos + n) % cycle_len,
                Ok(Sent::Shutdown) => return Ok(()),
                Err(e) if is_gone(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsyncStreamHandler for Chargen {
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
        let cycle_len = PRINTABLE * (LINE + 2);
        let mut pos = 0;
        loop {
            conn.discard_input()?;
            let end = (pos + 16 * 1024).min(self.cycle.len());
            match conn.send(&self.cycle[pos..end]).await {
                Ok(Sent::Bytes(n)) => pos = (pos + n) % cycle_len,
                Ok(Sent::Shutdown) => return Ok(()),
                Err(e) if is_gone(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The client has had enough: normal for chargen.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl DatagramHandler for Chargen {
    fn handle(&self, _: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
        let len = fastrand::usize(0..=512);
        reply.extend_from_slice(&self.cycle[..len]);
        Ok(true)
    }
}

pub(super) fn plugin() -> PluginInfo {
    super::builtin(
        "chargen",
        "RFC 864: sends the rotating character pattern until the client closes",
        || Chargen {
            cycle: pattern(0, PRINTABLE + 1 + 16 * 1024 / (LINE + 2)),
        },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn pattern_rotates_by_one_per_line() {
        let p = super::pattern(0, 2);
        assert_eq!(&p[..3], b" !\"");
        assert_eq!(&p[72..74], b"\r\n");
        assert_eq!(&p[74..77], b"!\"#");
        assert_eq!(p.len(), 148);
    }
}
