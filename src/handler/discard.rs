//! `discard` (RFC 863): reads and throws away everything; answers nothing.
//! Nothing is ever owed to the client, so it stops at once when asked to.

use std::io;

use super::{
    AsyncConnection, AsyncStreamHandler, Connection, Datagram, DatagramHandler, Input, PluginInfo,
    Recv, StreamHandler,
};

struct Discard;

impl StreamHandler for Discard {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if conn.shutting_down() {
                return Ok(());
            }
            match conn.recv(&mut buf)? {
                Recv::Data(_) => {}
                Recv::Eof | Recv::Shutdown => return Ok(()),
            }
        }
    }
}

impl AsyncStreamHandler for Discard {
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
        loop {
            if conn.shutting_down() {
                return Ok(());
            }
            match conn.recv().await? {
                Input::Data(_) => {}
                Input::Eof | Input::Shutdown => return Ok(()),
            }
        }
    }
}

impl DatagramHandler for Discard {
    fn handle(&self, _: &Datagram<'_>, _: &mut Vec<u8>) -> io::Result<bool> {
        Ok(false)
    }
}

pub(super) fn plugin() -> PluginInfo {
    super::builtin(
        "discard",
        "RFC 863: reads and throws away everything",
        || Discard,
    )
}
