//! tokio-echo: echoes every byte back on each TCP connection, one task per
//! connection on tokio's multi-threaded runtime.
//!
//! usage: tokio-echo [ADDR]   (default 127.0.0.1:0; prints "listening on
//! ADDR" once bound, so a script can start it on a free port)
//!
//! The listen backlog is 1024, as the other peers' (`-b 1024`,
//! `request_queue_size`, gevent's `backlog`) and preforkd's default:
//! `TcpListener::bind` would give 128, which a ramp to thousands of
//! connections overflows.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const BACKLOG: u32 = 1024;

async fn echo(mut s: TcpStream) {
    // Small requests: do not hold an echo back waiting for more.
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A listener on `addr` (IP:PORT) with a backlog of `BACKLOG`.
fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let a: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let s = if a.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(a)?;
    s.listen(BACKLOG)
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = match listen(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tokio-echo: cannot listen on {addr}: {e}; give a free HOST:PORT");
            std::process::exit(1);
        }
    };
    println!(
        "listening on {}",
        listener.local_addr().expect("bound address")
    );
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(echo(s));
            }
            // Out of descriptors, say: keep serving those already open,
            // and do not spin while none is freed.
            Err(e) => {
                eprintln!("tokio-echo: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
