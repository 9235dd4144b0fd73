//! `echo` (RFC 862): sends back every byte it receives.
//!
//! On streams it stops only at a point where nothing is owed: every byte read
//! has been written back and no more input is pending.

use std::io::{self, Write};

use super::{
    AsyncConnection, AsyncStreamHandler, Connection, Datagram, DatagramHandler, Input, PluginInfo,
    Recv, StreamHandler,
};

struct Echo;

impl StreamHandler for Echo {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match conn.recv(&mut buf)? {
                Recv::Data(n) => conn.write_all(&buf[..n])?,
                Recv::Eof | Recv::Shutdown => return Ok(()),
            }
        }
    }
}

/// Each read is written back before the next; the buffer goes back to the
/// worker in between, so an idle connection holds none.
impl AsyncStreamHandler for Echo {
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
        loop {
            match conn.recv().await? {
                Input::Data(bytes) => conn.write_all(&bytes).await?,
                Input::Eof | Input::Shutdown => return Ok(()),
            }
        }
    }
}

impl DatagramHandler for Echo {
    fn handle(&self, datagram: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
        reply.extend_from_slice(datagram.data);
        Ok(true)
    }
}

pub(super) fn plugin() -> PluginInfo {
    super::builtin("echo", "RFC 862: sends back every byte it receives", || {
        Echo
    })
}
