//! wait mode: try one echo at a time until one succeeds or the time is up,
//! so that scripts start measuring only once a server really serves.

use crate::cli::{Config, Target};
use crate::load::connect;
use crate::payload::Payload;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// One try's limit: a server that is up answers an echo well within it.
const TRY: Duration = Duration::from_millis(500);
const BETWEEN: Duration = Duration::from_millis(50);

fn echo_once(cfg: &Config, limit: Duration) -> Result<(), String> {
    let mut p = Payload::new(cfg.size, 0xffff);
    p.advance();
    let mut back = vec![0u8; p.buf.len()];
    match &cfg.target {
        Target::Udp(a) => {
            let local: SocketAddr = if a.is_ipv4() {
                (Ipv4Addr::LOCALHOST, 0).into()
            } else {
                (Ipv6Addr::LOCALHOST, 0).into()
            };
            let s = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
            s.connect(a).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
            s.send(&p.buf).map_err(|e| format!("send: {e}"))?;
            let n = s.recv(&mut back).map_err(|e| format!("no echo: {e}"))?;
            back.truncate(n);
        }
        t => {
            let mut s = connect(t, None, limit).map_err(|e| format!("connect: {e}"))?;
            s.write_all(&p.buf).map_err(|e| format!("send: {e}"))?;
            s.read_exact(&mut back)
                .map_err(|e| format!("no echo: {e}"))?;
        }
    }
    if back != p.buf {
        return Err("the answer is not an echo of the message".into());
    }
    Ok(())
}

/// Ok once an echo came back; Err with the last failure after --timeout-ms.
pub fn wait(cfg: &Config) -> Result<(), String> {
    let deadline = Instant::now() + cfg.timeout;
    let mut tries = 0;
    loop {
        tries += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match echo_once(cfg, TRY.min(left).max(Duration::from_millis(1))) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() + BETWEEN >= deadline {
            return Err(format!(
                "{} did not echo within {} ms ({tries} tries, last: {err}); is the server running there?",
                cfg.target,
                cfg.timeout.as_millis()
            ));
        }
        std::thread::sleep(BETWEEN);
    }
}
