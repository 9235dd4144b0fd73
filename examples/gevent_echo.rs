//! The socketserver tutorial's last server, gevent's `StreamServer` echo,
//! as an event-driven Rust handler: a binary with the whole `preforkd` CLI
//! plus one plugin, `gevent-echo`, that serves `mode = "async"` services.
//! Each worker runs one event loop serving up to `worker_connections`
//! clients at once, switching at each read as gevent's coroutines do.
//!
//! The handler echoes each read as it comes and, when the client closes
//! its side (EOF), shuts down the write side: everything sent before the
//! client's FIN comes back, then a FIN of our own.
//!
//! ```sh
//! cat > /tmp/gevent-echo.toml <<'EOF'
//! [[service]]
//! name = "gevent-echo"
//! listen = ["tcp://127.0.0.1:8012"]
//! workers = 2
//! mode = "async"
//! worker_connections = 10000
//! [service.handler]
//! plugin = "gevent-echo"
//! EOF
//! cargo run --example gevent_echo -- -c /tmp/gevent-echo.toml
//! nc 127.0.0.1 8012
//! ```

use std::io;

use preforkd::handler::{
    AsyncConnection, AsyncStreamHandler, Handlers, Input, PluginInfo, Registry,
};

/// gevent's `handle(socket, address)`: one task per client on the
/// worker's loop.
struct GeventEcho;

impl AsyncStreamHandler for GeventEcho {
    async fn handle(&self, conn: &mut AsyncConnection) -> io::Result<()> {
        loop {
            match conn.recv().await? {
                // The buffer is the worker's: it goes back when `data` is
                // dropped, so a client that says nothing holds none.
                Input::Data(data) => conn.write_all(&data).await?,
                Input::Eof => return conn.shutdown_write(),
                // The worker is stopping and nothing is owed.
                Input::Shutdown => return Ok(()),
            }
        }
    }
}

fn main() {
    let mut registry = Registry::builtin();
    registry.register(
        PluginInfo::new(
            "gevent-echo",
            "the socketserver tutorial's gevent echo server: echoes each read, FIN after the client's",
            |ctx| {
                ctx.expect_options("gevent-echo", &[])?;
                Ok(Handlers::async_stream(GeventEcho))
            },
        )
        .modes(false, true)
        .with_check(|ctx| ctx.expect_options("gevent-echo", &[])),
    );
    preforkd::cli::main_with(registry)
}
