//! `daytime` (RFC 867): answers the current date and time as one line of
//! ASCII, then closes. The RFC leaves the format open; this is the HTTP date
//! form (`Sat, 28 Nov 2026 13:25:50 GMT`), in UTC.

use std::io::{self, Write};
use std::time::SystemTime;

use super::{
    AsyncConnection, AsyncStreamHandler, Connection, Datagram, DatagramHandler, PluginInfo,
    StreamHandler,
};

struct Daytime;

fn now_line() -> String {
    format!("{}\r\n", httpdate::fmt_http_date(SystemTime::now()))
}

impl StreamHandler for Daytime {
    fn handle(&self, conn: &mut Connection) -> io::Result<()> {
        conn.write_all(now_line().as_bytes())
    }
}

impl AsyncStreamHandler for Daytime {
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
        conn.write_all(now_line().as_bytes()).await
    }
}

impl DatagramHandler for Daytime {
    fn handle(&self, _: &Datagram<'_>, reply: &mut Vec<u8>) -> io::Result<bool> {
        reply.extend_from_slice(now_line().as_bytes());
        Ok(true)
    }
}

pub(super) fn plugin() -> PluginInfo {
    super::builtin(
        "daytime",
        "RFC 867: sends the date and time, then closes",
        || Daytime,
    )
}
