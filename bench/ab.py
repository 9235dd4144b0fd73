#!/usr/bin/env python3
"""Side-by-side throughput of several preforkd servers (binaries, plugins or
settings), measured in one run, rounds interleaved (A B A B ...), so that the
ratios compare numbers taken seconds apart on the same noisy machine.

    python3 bench/ab.py \\
        --server before=/tmp/before/preforkd \\
        --server after=target/release/preforkd \\
        [--server dylib=target/release/preforkd:handler.toml] \\
        [--mode rr|connect] [--conns 8,64] [--rounds 3] [--duration 10] \\
        [--address tokio=127.0.0.1:PORT] \\
        [--workers 2] [--threads 32] [--extra service.toml] \\
        [--engine epoll|threads]

Each --server is NAME=BINARY[:HANDLER]: HANDLER is a file holding the
`[service.handler]` table (default: `plugin = "echo"`). --extra is a file of
keys added to every server's [[service]] table; when they set
`mode = "async"`, no `threads` key is written (an async service refuses
one: set `worker_connections` there instead). Every server runs on
127.0.0.1 with a port of its own (picked free), log level warn, and is
stopped at the end. Prints a markdown table: the median rate per server and
concurrency (± half the min-max range), p50/p99 latency of the median run,
errors, and the ratio to the first server. --address NAME=HOST:PORT adds a
server that is already running on loopback (a peer such as
bench/peers/tokio-echo), measured in the same rounds, in the order given:
first, it is the ratio's base.

The load generator is bench/loadgen (--loadgen to use another), built with
cargo when missing or older than its sources; --engine picks its engine
(default: loadgen's own, epoll for rr and connect).
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


from loadgen_build import LOADGEN, ensure_loadgen  # noqa: E402  (bench/ is on sys.path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_async(extra):
    """Whether the extra [[service]] keys set mode = "async"."""
    try:
        return tomllib.loads(extra).get("mode") == "async"
    except tomllib.TOMLDecodeError as e:
        sys.exit(f"bench/ab.py: --extra: not TOML: {e}")


def start(name, binary, handler, a, tmp):
    port = free_port()
    extra = open(a.extra).read() if a.extra else ""
    threads = "" if is_async(extra) else f"threads = {a.threads}\n"
    handler_text = open(handler).read() if handler else '[service.handler]\nplugin = "echo"\n'
    cfg = os.path.join(tmp, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(f"""[log]
level = "warn"
[[service]]
name = "bench"
listen = ["tcp://127.0.0.1:{port}"]
workers = {a.workers}
{threads}{extra}
{handler_text}""")
    log = open(os.path.join(tmp, f"{name}.log"), "w+")
    p = subprocess.Popen([binary, "-c", cfg], stdout=log, stderr=log, start_new_session=True)
    w = subprocess.run([a.loadgen, "wait", "--tcp", f"127.0.0.1:{port}", "--timeout-ms", "20000"],
                       capture_output=True, text=True)
    if w.returncode != 0:
        log.seek(0)
        sys.exit(f"{name}: not serving on {port}: {w.stderr.strip()}\n{log.read()}")
    return p, port


def wait_for(name, addr, a):
    """An --address server: measured as it is, once it echoes."""
    w = subprocess.run([a.loadgen, "wait", "--tcp", addr, "--timeout-ms", "20000"],
                       capture_output=True, text=True)
    if w.returncode != 0:
        sys.exit(f"{name}: {w.stderr.strip()}")


def main():
    ap = argparse.ArgumentParser()
    # Both kinds go to one list, so that the order of the command line is
    # the order of the table (the first is the ratio's base).
    ap.add_argument("--server", action="append", dest="specs", type=lambda v: ("server", v))
    ap.add_argument("--address", action="append", dest="specs", type=lambda v: ("address", v),
                    help="NAME=HOST:PORT: a server already running on loopback (a peer)")
    ap.add_argument("--mode", default="rr", choices=["rr", "connect"])
    ap.add_argument("--conns", default="8,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--extra")
    ap.add_argument("--engine", choices=["epoll", "threads"],
                    help="loadgen's engine (default: loadgen's own, epoll)")
    ap.add_argument("--loadgen",
                    default=LOADGEN,
                    help="load generator (default bench/loadgen, built when missing or stale)")
    a = ap.parse_args()
    ensure_loadgen(a.loadgen, "bench/ab.py")

    tmp = tempfile.mkdtemp(prefix="pfd-ab-")
    if not a.specs:
        ap.error("give at least one --server NAME=BINARY[:HANDLER] or --address NAME=HOST:PORT")
    servers, addresses = [], {}
    for kind, spec in a.specs:
        name, _, rest = spec.partition("=")
        if kind == "address":
            addresses[name] = rest
            servers.append((name, None, None))
        else:
            binary, _, handler = rest.partition(":")
            servers.append((name, binary, handler or None))
    procs = {}
    try:
        for name, binary, handler in servers:
            if name in addresses:
                wait_for(name, addresses[name], a)
            else:
                procs[name] = start(name, binary, handler, a, tmp)
        conns = [int(c) for c in a.conns.split(",")]
        runs = {}  # (name, conc) -> [result]
        print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", file=sys.stderr)
        print(f"load average before: {os.getloadavg()}", file=sys.stderr)
        for r in range(a.rounds):
            for c in conns:
                for name, _, _ in servers:
                    addr = addresses.get(name) or f"127.0.0.1:{procs[name][1]}"
                    engine = ["--engine", a.engine] if a.engine else []
                    out = subprocess.run(
                        [a.loadgen, a.mode, "--tcp", addr, "-c", str(c),
                         "-d", str(a.duration), "--warmup", "1", "--json", *engine],
                        capture_output=True, text=True, timeout=a.duration + 60)
                    res = json.loads(out.stdout)
                    runs.setdefault((name, c), []).append(res)
                    print(f"round {r + 1} {name} c={c}: {res['rate']:.0f} {res['unit']}"
                          f" errors {res['errors_total']}", file=sys.stderr)
        unit = "req/s" if a.mode == "rr" else "conn/s"
        print(f"| server | mode | conc | rate ({unit}, median of {a.rounds}) | ± | p50 µs | p99 µs"
              f" | errors | × {servers[0][0]} |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c in conns:
            base = statistics.median(x["rate"] for x in runs[(servers[0][0], c)])
            for name, _, _ in servers:
                rs = runs[(name, c)]
                rates = [x["rate"] for x in rs]
                med = statistics.median(rates)
                mid = sorted(rs, key=lambda x: x["rate"])[len(rs) // 2]
                spread = (max(rates) - min(rates)) / 2 / med * 100 if med else 0
                errors = sum(x["errors_total"] for x in rs)
                print(f"| {name} | {a.mode} | {c} | {med:.0f} | {spread:.1f}% |"
                      f" {mid['latency_us']['p50']:.0f} | {mid['latency_us']['p99']:.0f} |"
                      f" {errors} | {med / base:.3f} |")
    finally:
        for p, _ in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
