#!/usr/bin/env python3
"""Line echo server on the standard library's socketserver, a peer for
preforkd's benchmarks: ForkingTCPServer (a child process per connection)
or ThreadingTCPServer (a thread per connection), each with a
StreamRequestHandler that writes every line back until EOF.

    python3 bench/peers/socketserver_echo.py forking|threading [PORT] [--max-children N]

Listens on 127.0.0.1:PORT (default 0: a free port) and prints
"listening on 127.0.0.1:PORT" once bound. --max-children sets
ForkingMixIn.max_children (the stdlib's default, 40, makes clients past the
40th wait for a child to exit; the benchmarks raise it to 1024).
"""
import argparse
import socketserver


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


def main():
    ap = argparse.ArgumentParser(description="socketserver line echo")
    ap.add_argument("kind", choices=["forking", "threading"])
    ap.add_argument("port", type=int, nargs="?", default=0)
    ap.add_argument("--max-children", type=int, default=1024)
    a = ap.parse_args()
    base = socketserver.ForkingTCPServer if a.kind == "forking" else socketserver.ThreadingTCPServer

    class Server(base):
        # What a user tuning for load sets: restart without TIME_WAIT
        # trouble, and a backlog that holds a burst of connects.
        allow_reuse_address = True
        request_queue_size = 1024
        daemon_threads = True
        max_children = a.max_children

    with Server(("127.0.0.1", a.port), Echo) as srv:
        print("listening on %s:%d" % srv.server_address, flush=True)
        srv.serve_forever()


if __name__ == "__main__":
    main()
