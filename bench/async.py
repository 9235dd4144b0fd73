#!/usr/bin/env python3
"""Event-driven workers (issue 13), side by side: preforkd `mode = "async"`
against preforkd's threads mode and the peers, in one run, rounds
interleaved, so that every ratio compares numbers taken seconds apart.

    python3 bench/async.py [--preforkd target/release/preforkd] \\
        [--rounds 3] [--duration 3] [--conns 8,64,1000] \\
        [--idle 10000] [--idle-time 5] [--exec-conns 500] \\
        [--cases rr,connect,idle,exec] [--save results.json]

Servers (echo, 64-byte messages, all on 127.0.0.1, free ports):

  preforkd async    mode = "async", 2 workers, worker_connections 4096
  preforkd threads  2 workers x 32 threads (today's default shape)
  tokio             bench/peers/tokio-echo (multi-threaded runtime)
  gevent            bench/peers/gevent_echo.py (pip install gevent)
  forking           bench/peers/socketserver_echo.py forking (ForkingTCPServer)
  tcpserver + cat   ucspi-tcp's tcpserver (apt-get install ucspi-tcp)

A peer that cannot start here is skipped with one line naming what to
install; a preforkd configuration its binary refuses (a build without
`mode = "async"`, or a plugin that does not serve that mode) is skipped with
`preforkd check`'s message, and the script exits 1 at the end.

Cases:

  rr       loadgen rr -c N for each N of --conns: requests per second
  connect  loadgen connect -c 8 --src-ips 16: new connections per second
  idle     loadgen hold -c --idle on preforkd async (2 workers,
           worker_connections 16384), with tokio and gevent for reference:
           all served (an echo on each before and after the idle time), and
           RSS per idle connection = (sum of the server's RSS while they are
           held - the sum before connecting) / connections, from
           /proc/PID/status VmRSS (preforkd: its workers, the master's
           children; a peer: its process)
  exec     `exec` running /bin/cat in async mode against exec in threads
           mode (2 x 256 threads, so 500 programs fit) and tcpserver + cat:
           new connections per second, and --exec-conns programs at once
           (loadgen hold): all served

loadgen runs its epoll engine on one loop (the fairest client on two shared
cores: one thread, no hand-offs between client threads). Prints markdown
tables with ratios to tokio and to gevent, and the issue's targets; the
machine (nproc, uname -r, load average) and the date go first.
"""
import argparse
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from loadgen_build import LOADGEN, TOKIO_CRATE, TOKIO_ECHO, ensure_built, ensure_loadgen  # noqa: E402

ME = "bench/async.py"
# How long a server gets to start serving.
READY_MS = 20000
# Settle time after loadgen says the connections are held, before the RSS
# is read (workers finish their accept bursts).
SETTLE_S = 0.5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    """VmRSS of `pid` in KiB; None when it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


class Skip(Exception):
    """A server that cannot run here: the reason, one line."""


class Server:
    """A server process in a session of its own (stopped with its whole
    process group), serving on `addr` once started."""

    def __init__(self, name, tmp):
        self.name = name
        self.tmp = tmp
        self.proc = None
        self.addr = None
        self.log_path = os.path.join(tmp, name.replace(" ", "-").replace("+", "") + ".log")

    def launch(self, argv, read_addr=False):
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE if read_addr else log,
                                     stderr=log, start_new_session=True, text=True)
        if read_addr:
            # The peers print "listening on ADDR" once bound.
            ready, _, _ = select.select([self.proc.stdout], [], [], READY_MS / 1000)
            line = self.proc.stdout.readline() if ready else ""
            if not line.startswith("listening on "):
                raise Skip(f"did not say where it listens ({self.log_tail()})")
            self.addr = line.split()[2]

    def wait_ready(self, loadgen):
        w = subprocess.run([loadgen, "wait", "--tcp", self.addr, "--timeout-ms", str(READY_MS)],
                           capture_output=True, text=True)
        if w.returncode != 0:
            raise Skip(f"not serving on {self.addr}: {w.stderr.strip()} ({self.log_tail()})")

    def log_tail(self):
        try:
            with open(self.log_path) as f:
                lines = [x.strip() for x in f if x.strip()]
            return lines[-1] if lines else "nothing in its log"
        except FileNotFoundError:
            return "no log"

    def pids(self):
        """The processes whose RSS is the server's (a peer: itself)."""
        return [self.proc.pid]

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Preforkd(Server):
    """preforkd with one service (`service` holds its keys besides name
    and listen) checked with `preforkd check` before it starts."""

    def __init__(self, name, tmp, binary, service):
        super().__init__(name, tmp)
        self.binary = binary
        self.service = service

    def start(self, loadgen):
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        cfg = os.path.join(self.tmp, self.name.replace(" ", "-") + ".toml")
        with open(cfg, "w") as f:
            f.write(f'[log]\nlevel = "warn"\n\n[[service]]\nname = "bench"\n'
                    f'listen = ["tcp://{self.addr}"]\n{self.service}')
        c = subprocess.run([self.binary, "-c", cfg, "check"], capture_output=True, text=True)
        if c.returncode != 0:
            msg = (c.stderr.strip() or c.stdout.strip()).splitlines()
            why = msg[-1] if msg else f"exit {c.returncode}"
            if "unknown field `mode`" in why or "unknown field `worker_connections`" in why:
                raise Skip(f"{self.binary} has no mode = \"async\" (issue 13); build one that"
                           f" has it (preforkd check: {why})")
            raise Skip(f"preforkd check refused its config: {why}")
        self.launch([self.binary, "-c", cfg])
        self.wait_ready(loadgen)

    def pids(self):
        # The workers: the master's children (an exec worker's programs are
        # their children, not counted).
        return children(self.proc.pid)


class Peer(Server):
    def __init__(self, name, tmp, argv, needs=None):
        super().__init__(name, tmp)
        self.argv = argv
        self.needs = needs

    def start(self, loadgen):
        if self.needs:
            self.needs()
        self.launch(self.argv, read_addr=True)
        self.wait_ready(loadgen)


class Tcpserver(Server):
    def __init__(self, name, tmp):
        super().__init__(name, tmp)

    def start(self, loadgen):
        if not shutil.which("tcpserver"):
            raise Skip("tcpserver not found; install it with: apt-get install ucspi-tcp")
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        # -H -R -l: no DNS or ident lookups per connection; -c -b: 1024
        # concurrent programs and a backlog of 1024, as the peers have.
        self.launch(["tcpserver", "-q", "-H", "-R", "-l", "localhost", "-c", "1024", "-b", "1024",
                     "127.0.0.1", str(port), "cat"])
        self.wait_ready(loadgen)


def need_gevent():
    r = subprocess.run([sys.executable, "-c", "import gevent"], capture_output=True)
    if r.returncode != 0:
        raise Skip("gevent is not installed; install it with: pip install gevent")


def loadgen_json(a, args, limit):
    out = subprocess.run([a.loadgen, *args, "--json"], capture_output=True, text=True,
                         timeout=limit)
    if out.returncode not in (0, 1) or not out.stdout.strip():
        return {"failed": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
    return json.loads(out.stdout)


def hold(a, server, conns, idle_s, measure):
    """loadgen hold on `server`; with `measure`, the server's RSS before
    and while the connections are held. The result, with rss fields."""
    pids = server.pids() if measure else []
    before = sum(rss_kib(p) or 0 for p in pids)
    p = subprocess.Popen([a.loadgen, "hold", "--tcp", server.addr, "-c", str(conns),
                          "-d", str(idle_s), "--timeout-ms", "10000", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, held = [], {}

    def read_stderr():
        # loadgen prints "loadgen hold: ..." when the idle time starts;
        # the RSS is read then (and again later: the larger counts).
        for line in p.stderr:
            lines.append(line)
            if line.startswith("loadgen hold:") and measure:
                samples = []
                for wait in (SETTLE_S, max(idle_s / 2 - SETTLE_S, 0.1)):
                    time.sleep(wait)
                    now = server.pids()
                    samples.append((sum(rss_kib(q) or 0 for q in now), now))
                held["kib"], held["pids"] = max(samples, key=lambda s: s[0])

    t = threading.Thread(target=read_stderr)
    t.start()
    # loadgen ends by itself; this is for one that does not.
    watchdog = threading.Timer(120 + idle_s, p.kill)
    watchdog.start()
    out = p.stdout.read()
    p.wait()
    watchdog.cancel()
    t.join()
    try:
        res = json.loads(out)
    except json.JSONDecodeError:
        res = {"failed": [x.strip() for x in lines[-1:]] or ["no output"]}
    if measure and "kib" in held:
        res["rss_before_kib"] = before
        res["rss_held_kib"] = held["kib"]
        res["rss_pids_same"] = sorted(held["pids"]) == sorted(pids)
        res["rss_per_conn_b"] = (held["kib"] - before) * 1024 / conns
    return res


def median_rate(rs):
    rates = [r["rate"] for r in rs if "rate" in r]
    return statistics.median(rates) if rates else None


def spread(rs):
    rates = [r["rate"] for r in rs if "rate" in r]
    med = statistics.median(rates) if rates else 0
    return (max(rates) - min(rates)) / 2 / med * 100 if med else 0


def mid(rs):
    ok = sorted((r for r in rs if "rate" in r), key=lambda r: r["rate"])
    return ok[len(ok) // 2] if ok else None


def ratio(x, base):
    return f"{x / base:.2f}" if x is not None and base else "—"


def round_ratios(rs, base_rs):
    """The ratio of each round (two runs seconds apart): min and max."""
    pairs = [(r["rate"], b["rate"]) for r, b in zip(rs, base_rs)
             if "rate" in r and "rate" in b and b["rate"]]
    if not pairs:
        return None
    rs_ = [x / b for x, b in pairs]
    return min(rs_), statistics.median(rs_), max(rs_)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preforkd", default=os.path.join(ROOT, "target", "release", "preforkd"))
    ap.add_argument("--loadgen", default=LOADGEN,
                    help="load generator (default bench/loadgen, built when missing or stale)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3, help="seconds measured per run")
    ap.add_argument("--conns", default="8,64,1000", help="rr concurrencies")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections held")
    ap.add_argument("--idle-time", type=float, default=5, help="seconds they are held")
    ap.add_argument("--exec-conns", type=int, default=500, help="exec programs at once")
    ap.add_argument("--cases", default="rr,connect,idle,exec")
    ap.add_argument("--save", help="write every run's loadgen JSON to this file")
    a = ap.parse_args()
    cases = set(a.cases.split(","))
    if cases - {"rr", "connect", "idle", "exec"}:
        ap.error(f"--cases: unknown {sorted(cases - {'rr', 'connect', 'idle', 'exec'})}")
    if not os.path.exists(a.preforkd):
        sys.exit(f"{ME}: {a.preforkd}: no such binary; run cargo build --release first")
    ensure_loadgen(a.loadgen, ME)
    ensure_built(TOKIO_ECHO, TOKIO_CRATE, ME)

    tmp = tempfile.mkdtemp(prefix="pfd-async-")
    py = sys.executable
    peer = os.path.join(HERE, "peers")
    echo = '[service.handler]\nplugin = "echo"\n'
    cat = '[service.handler]\nplugin = "exec"\n[service.handler.options]\ncommand = ["/bin/cat"]\n'
    conns = [int(c) for c in a.conns.split(",")]
    big = max(conns + [a.exec_conns])
    wc = max(4096, big)

    def echo_servers():
        return [
            Preforkd("preforkd async", tmp, a.preforkd,
                     f'workers = 2\nmode = "async"\nworker_connections = {wc}\n{echo}'),
            Preforkd("preforkd threads", tmp, a.preforkd, f"workers = 2\nthreads = 32\n{echo}"),
            Peer("tokio", tmp, [TOKIO_ECHO]),
            Peer("gevent", tmp, [py, os.path.join(peer, "gevent_echo.py")], needs=need_gevent),
            Peer("forking", tmp, [py, os.path.join(peer, "socketserver_echo.py"), "forking",
                                  "--max-children", "1024"]),
            Tcpserver("tcpserver + cat", tmp),
        ]

    started, skipped, refused = [], [], []

    def start_all(servers):
        """Start `servers`: those serving, and the names of the preforkd
        ones refused here."""
        up, no = [], []
        for s in servers:
            try:
                s.start(a.loadgen)
                started.append(s)
                up.append(s)
            except Skip as e:
                s.stop()
                skipped.append((s.name, str(e)))
                if isinstance(s, Preforkd):
                    refused.append(s.name)
                    no.append(s.name)
                print(f"skipped {s.name}: {e}", file=sys.stderr)
        return up, no

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    saved = {}
    out = []
    # The 1-minute load average at each round's start: how busy the
    # shared machine was while measuring.
    loads = []

    def say(line=""):
        out.append(line)

    try:
        # rr and connect: every echo server, cases interleaved per round.
        runs = {}
        if cases & {"rr", "connect"}:
            servers, no = start_all(echo_servers())
            plan = [("rr", c) for c in conns if "rr" in cases]
            if "connect" in cases:
                plan.append(("connect", 8))
            for r in range(a.rounds):
                loads.append(os.getloadavg()[0])
                for mode, c in plan:
                    for s in servers:
                        extra = ["--src-ips", "16"] if mode == "connect" else []
                        res = loadgen_json(a, [mode, "--tcp", s.addr, "-c", str(c),
                                               "-d", str(a.duration), "--warmup", "1", *extra],
                                           a.duration + 60)
                        runs.setdefault((mode, c, s.name), []).append(res)
                        shown = (f"{res['rate']:.0f} {res['unit']} errors {res['errors_total']}"
                                 f" starved {res['starved']}" if "rate" in res
                                 else f"failed: {res['failed']}")
                        print(f"round {r + 1} {mode} c={c} {s.name}: {shown}", file=sys.stderr)
            for s in servers:
                s.stop()
            saved["rr_connect"] = {f"{m} {c} {n}": v for (m, c, n), v in runs.items()}

            say("| case | server | rate (median) | ± | p50 µs | p99 µs | errors | starved"
                " | × tokio | × gevent |")
            say("|---|---|---|---|---|---|---|---|---|---|")
            for mode, c in plan:
                base = median_rate(runs.get((mode, c, "tokio"), []))
                gev = median_rate(runs.get((mode, c, "gevent"), []))
                for name in no:
                    say(f"| {mode} {c} | {name} | not measured (skipped, above) | | | | | | | |")
                for s in servers:
                    rs = runs[(mode, c, s.name)]
                    m, x = median_rate(rs), mid(rs)
                    unit = "conn/s" if mode == "connect" else "req/s"
                    if x is None:
                        say(f"| {mode} {c} | {s.name} | failed | | | | | | | |")
                        continue
                    errors = sum(r.get("errors_total", 0) for r in rs)
                    starved = max(r.get("starved", 0) for r in rs)
                    say(f"| {mode} {c} | {s.name} | {m:.0f} {unit} | {spread(rs):.0f}% |"
                        f" {x['latency_us']['p50']:.0f} | {x['latency_us']['p99']:.0f} |"
                        f" {errors} | {starved} | {ratio(m, base)} | {ratio(m, gev)} |")
            say()

        # idle: 10,000 connections held on 2 async workers; peers for reference.
        idle = {}
        if "idle" in cases:
            servers, no = start_all([
                Preforkd("preforkd async", tmp, a.preforkd,
                         f'workers = 2\nmode = "async"\nworker_connections = {max(16384, a.idle)}\n'
                         f"{echo}"),
                Peer("tokio", tmp, [TOKIO_ECHO]),
                Peer("gevent", tmp, [py, os.path.join(peer, "gevent_echo.py")], needs=need_gevent),
            ])
            for s in servers:
                idle[s.name] = hold(a, s, a.idle, a.idle_time, measure=True)
                res = idle[s.name]
                print(f"idle {s.name}: {res.get('served')} of {a.idle} served, "
                      f"{res.get('rss_per_conn_b', float('nan')):.0f} B per connection", file=sys.stderr)
                s.stop()
            saved["idle"] = idle
            say(f"| {a.idle} idle connections, {a.idle_time:g} s | held | served after"
                " | all served | setup ms | RSS before KiB | RSS held KiB | RSS per idle connection |")
            say("|---|---|---|---|---|---|---|---|")
            for name in no:
                say(f"| {name} | not measured (skipped, above) | | | | | | |")
            for name, res in idle.items():
                if "failed" in res:
                    say(f"| {name} | failed: {res['failed']} | | | | | | |")
                    continue
                per = res.get("rss_per_conn_b")
                note = "" if res.get("rss_pids_same", True) else " (worker set changed)"
                per_s = f"{per:.0f} B{note}" if per is not None else "—"
                say(f"| {name} | {res['held']} | {res['served']} |"
                    f" {'yes' if res['all_served'] else 'no'} | {res['setup_ms']:.0f} |"
                    f" {res.get('rss_before_kib', '—')} | {res.get('rss_held_kib', '—')} |"
                    f" {per_s} |")
            say()

        # exec: cat per connection, async against threads and tcpserver.
        ex = {}
        if "exec" in cases:
            servers, no = start_all([
                Preforkd("exec async", tmp, a.preforkd,
                         f'workers = 2\nmode = "async"\nworker_connections = {wc}\n{cat}'),
                Preforkd("exec threads", tmp, a.preforkd, f"workers = 2\nthreads = 256\n{cat}"),
                Tcpserver("tcpserver + cat", tmp),
            ])
            for r in range(a.rounds):
                for s in servers:
                    res = loadgen_json(a, ["connect", "--tcp", s.addr, "-c", "8", "-d",
                                           str(a.duration), "--warmup", "1", "--src-ips", "16"],
                                       a.duration + 60)
                    ex.setdefault(s.name, []).append(res)
                    print(f"round {r + 1} exec connect {s.name}: {res.get('rate', 0):.0f} conn/s"
                          f" errors {res.get('errors_total')}", file=sys.stderr)
            many = {}
            for s in servers:
                many[s.name] = hold(a, s, a.exec_conns, 2, measure=False)
                print(f"exec {a.exec_conns} at once {s.name}: served {many[s.name].get('served')}",
                      file=sys.stderr)
                s.stop()
            saved["exec"] = {"connect": ex, "hold": many}
            base = median_rate(ex.get("tcpserver + cat", []))
            say(f"| exec cat | connect -c 8 (conn/s, median) | ± | errors | × tcpserver"
                f" | {a.exec_conns} programs at once: served | all served | setup ms |")
            say("|---|---|---|---|---|---|---|---|")
            for name in no:
                say(f"| {name} | not measured (skipped, above) | | | | | | |")
            for s in servers:
                rs, h = ex[s.name], many[s.name]
                m = median_rate(rs)
                errors = sum(r.get("errors_total", 0) for r in rs)
                served = h.get("served", "—")
                all_ = ("yes" if h.get("all_served") else "no") if "all_served" in h else "—"
                setup = f"{h['setup_ms']:.0f}" if "setup_ms" in h else "—"
                if m is None:
                    say(f"| {s.name} | failed: {rs[0].get('failed')} | | | | | | |")
                    continue
                say(f"| {s.name} | {m:.0f} | {spread(rs):.0f}% | {errors} | {ratio(m, base)} |"
                    f" {served} | {all_} | {setup} |")
            say()

        # The targets, from the tables above.
        a_name = "preforkd async"
        if runs or idle:
            say("| target | ratio of medians | median of per-round ratios (range) | |")
            say("|---|---|---|---|")
            if not any(n == a_name for (_, _, n) in runs) and a_name not in idle:
                say(f"| every target | {a_name} not measured (skipped, above) | | pending |")
            for mode, c in [("rr", c) for c in conns] + [("connect", 8)]:
                mine = runs.get((mode, c, a_name))
                if not mine:
                    continue
                for peer_name, want in [("tokio", 1.1 if mode == "rr" else 1.0), ("gevent", 2.0)]:
                    other = runs.get((mode, c, peer_name))
                    if not other:
                        continue
                    m, b = median_rate(mine), median_rate(other)
                    rr_ = round_ratios(mine, other)
                    got = m / b if m and b else None
                    verdict = ("met" if got >= want else f"missed by {(1 - got / want) * 100:.0f}%") \
                        if got else "—"
                    rng = f"{rr_[1]:.2f}× ({rr_[0]:.2f}–{rr_[2]:.2f})" if rr_ else "—"
                    say(f"| {mode} {c}: ≥ {want:g}× {peer_name} | {got:.2f}× | {rng} | {verdict} |"
                        if got else f"| {mode} {c}: ≥ {want:g}× {peer_name} | — | — | — |")
            res = idle.get(a_name)
            if res and "rss_per_conn_b" in res:
                per = res["rss_per_conn_b"]
                verdict = "met" if per <= 1024 else f"missed: {per / 1024:.2f}× the target"
                say(f"| {a.idle} idle on 2 workers: all served, ≤ 1 KiB RSS each |"
                    f" {'all served' if res['all_served'] else 'NOT all served'}, {per:.0f} B | |"
                    f" {verdict if res['all_served'] else 'missed'} |")
            say()
    finally:
        for s in started:
            s.stop()
        if a.save:
            with open(a.save, "w") as f:
                json.dump(saved, f, indent=1)

    print(f"date: {date}")
    print(f"machine: nproc {len(os.sched_getaffinity(0))}, {platform.system()} {platform.release()},"
          f" load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} before,"
          f" {os.getloadavg()[0]:.2f} after"
          + (f", {min(loads):.2f} to {max(loads):.2f} at the rr/connect rounds' starts" if loads else ""))
    print(f"loadgen: epoll engine, 1 loop, 64-byte messages, {a.duration:g} s measured after 1 s"
          f" of warm-up, {a.rounds} rounds interleaved")
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    print()
    print("\n".join(out))
    if refused:
        print(f"{ME}: not measured: {', '.join(refused)} (see the skipped lines above)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
