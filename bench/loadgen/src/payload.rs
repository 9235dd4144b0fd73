//! Request payloads: `size` printable bytes ending in '\n' (so line-based
//! echo servers such as socketserver's StreamRequestHandler answer them),
//! stamped per request so that a stale or misrouted echo is a mismatch.

/// Width of the stamp at the head of each message (hex digits).
const STAMP: usize = 16;

/// One connection's request buffer.
pub struct Payload {
    pub buf: Vec<u8>,
    /// The connection's id in the high bits, so two connections never send
    /// the same bytes.
    base: u64,
    seq: u64,
    stamp: usize,
}

impl Payload {
    /// `size` >= 1 (the parser enforces it); `id` < 2^24 keeps stamps unique.
    pub fn new(size: usize, id: u64) -> Payload {
        let size = size.max(1);
        // The body depends on the id too: a reply from another connection
        // differs outside the stamp as well.
        let buf = (0..size - 1)
            .map(|i| b'a' + ((i as u64 * 7 + id * 3) % 26) as u8)
            .chain(std::iter::once(b'\n'))
            .collect();
        Payload {
            buf,
            base: id << 40,
            seq: 0,
            stamp: (size - 1).min(STAMP),
        }
    }

    /// Write the next sequence number into the head of the buffer.
    pub fn advance(&mut self) {
        self.seq += 1;
        let mut v = self.base | self.seq;
        for b in self.buf[..self.stamp].iter_mut().rev() {
            *b = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
        }
    }

    /// True for the echo of an earlier request of this connection: same
    /// length and body, another stamp (a UDP reply that came too late).
    pub fn is_earlier_echo(&self, reply: &[u8]) -> bool {
        reply.len() == self.buf.len()
            && reply[self.stamp..] == self.buf[self.stamp..]
            && reply[..self.stamp] != self.buf[..self.stamp]
    }
}

#[cfg(test)]
mod tests {
    use super::Payload;

    #[test]
    fn printable_lines_of_the_asked_size() {
        for size in [1, 2, 16, 17, 64, 5000] {
            let mut p = Payload::new(size, 5);
            p.advance();
            assert_eq!(p.buf.len(), size);
            assert_eq!(p.buf[size - 1], b'\n');
            assert!(p.buf[..size - 1].iter().all(|b| b.is_ascii_graphic()));
        }
    }

    #[test]
    fn every_request_differs_and_late_echoes_are_known() {
        let mut p = Payload::new(64, 9);
        p.advance();
        let first = p.buf.clone();
        p.advance();
        assert_ne!(first, p.buf);
        assert!(p.is_earlier_echo(&first));
        assert!(!p.is_earlier_echo(&p.buf.clone()));
        let mut other = Payload::new(64, 10);
        other.advance();
        assert!(!p.is_earlier_echo(&other.buf));
    }
}
