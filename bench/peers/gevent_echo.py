#!/usr/bin/env python3
"""Line echo server on gevent's StreamServer (a greenlet per connection), a
peer for preforkd's benchmarks. Needs gevent: pip install gevent.

    python3 bench/peers/gevent_echo.py [PORT]

Listens on 127.0.0.1:PORT (default 0: a free port) and prints
"listening on 127.0.0.1:PORT" once bound.
"""
import sys

from gevent.server import StreamServer


def echo(sock, _address):
    with sock.makefile("rb") as lines:
        for line in lines:
            sock.sendall(line)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = StreamServer(("127.0.0.1", port), echo, backlog=1024)
    server.start()
    print("listening on %s:%d" % server.address, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
