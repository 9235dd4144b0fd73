#!/usr/bin/env python3
"""The fleet behind HAProxy, measured (docs/BENCHMARKS.md, "fleet" section).

1. Throughput through HAProxy to 3 preforkd hosts against HAProxy to 1 host,
   the same HAProxy, rounds interleaved (loadgen rr over TCP).
2. PROXY protocol v2 on against off: new connections per second to one
   preforkd directly, from a client that writes the v2 header itself,
   against the same client sending no header (two services of one daemon),
   rounds interleaved; plus the server's CPU time per connection.
3. A rolling restart of the 3 hosts under load: SIGTERM, exit, start, UP in
   HAProxy again, host after host; its total time and loadgen's errors.

Everything on loopback (hosts on 127.0.0.2..4, HAProxy on 127.0.0.1), ports
picked free, every run bounded. Needs haproxy (apt-get install haproxy) and
a release build (cargo build --release).

    python3 bench/fleet.py [--duration 5] [--rounds 3] [--conns 64]
"""

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loadgen_build import LOADGEN, ensure_loadgen  # noqa: E402


def loadgen_path():
    return LOADGEN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFORKD = os.path.join(ROOT, "target", "release", "preforkd")
INTER_MS, FALL = 500, 2


def free_port(ip="127.0.0.1"):
    s = socket.socket()
    s.bind((ip, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait(cond, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


class Host:
    def __init__(self, i, proxy=False):
        self.name = f"h{i}"
        self.ip = f"127.0.0.{2 + i}"
        self.dir = tempfile.mkdtemp(prefix="pfdbench")
        self.echo = free_port(self.ip)
        self.metrics = free_port(self.ip)
        self.proxy_port = free_port(self.ip) if proxy else None
        self.proc = None
        cfg = (
            f'[daemon]\npid_file = "{self.dir}/preforkd.pid"\nshutdown_delay = "2s"\n\n'
            f'[control]\nsocket = "{self.dir}/ctl.sock"\n\n'
            f'[metrics]\nlisten = "{self.ip}:{self.metrics}"\n\n'
            f'[[service]]\nname = "echo"\nlisten = ["tcp://{self.ip}:{self.echo}"]\n'
            'workers = 2\nthreads = 32\ngraceful_timeout = "10s"\n\n'
            '[service.handler]\nplugin = "echo"\n'
        )
        if proxy:
            cfg += (
                f'\n[[service]]\nname = "echo-proxy"\nlisten = ["tcp://{self.ip}:{self.proxy_port}"]\n'
                'workers = 2\nthreads = 32\nproxy_protocol = "v2"\nproxy_from = ["127.0.0.0/8"]\n\n'
                '[service.handler]\nplugin = "echo"\n'
            )
        self.config = os.path.join(self.dir, "preforkd.toml")
        with open(self.config, "w") as f:
            f.write(cfg)

    def start(self):
        self.log = open(os.path.join(self.dir, "preforkd.log"), "wb")
        self.proc = subprocess.Popen(
            [PREFORKD, "-c", self.config],
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait(lambda: b"INFO: ready: " in open(self.log.name, "rb").read(), what=f"{self.name} ready")

    def stop(self):
        """SIGTERM; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self):
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def cpu_ticks(self):
        """utime + stime of the master and its children (the workers)."""
        pids = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        total = 0
        for p in pids:
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total


class Haproxy:
    def __init__(self, hosts):
        self.dir = tempfile.mkdtemp(prefix="pfdhap")
        self.stats = os.path.join(self.dir, "stats.sock")
        self.port3, self.port1 = free_port(), free_port()

        def servers(hs):
            return "".join(
                f"    server {h.name} {h.ip}:{h.echo} check port {h.metrics} "
                f"inter {INTER_MS}ms fall {FALL} rise 2\n"
                for h in hs
            )

        cfg = f"""global
    stats socket {self.stats} level admin
    maxconn 4096
defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 3
    option redispatch 1
frontend fleet3
    bind 127.0.0.1:{self.port3}
    default_backend fleet3
frontend fleet1
    bind 127.0.0.1:{self.port1}
    default_backend fleet1
backend fleet3
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
{servers(hosts)}
backend fleet1
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
{servers(hosts[:1])}
"""
        path = os.path.join(self.dir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(cfg)
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", path],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "haproxy.log"), "wb"),
            start_new_session=True,
        )

    def status(self):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(self.stats)
        s.sendall(b"show stat\n")
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        s.close()
        lines = data.decode().splitlines()
        head = lines[0][2:].split(",")
        rows = [dict(zip(head, l.split(","))) for l in lines[1:] if l]
        return {(r["pxname"], r["svname"]): r["status"] for r in rows}

    def wait_status(self, backend, server, want, timeout=15):
        def ok():
            if self.proc.poll() is not None:
                raise SystemExit(f"haproxy exited: {open(os.path.join(self.dir, 'haproxy.log')).read()}")
            try:
                return self.status().get((backend, server)) == want
            except OSError:
                return False

        wait(ok, timeout, f"{backend}/{server} {want}")

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def loadgen(args, mode, port, conns, duration, extra=()):
    out = subprocess.run(
        [loadgen_path(), mode, "--tcp", f"127.0.0.1:{port}", "-c", str(conns), "-d", str(duration),
         "--warmup", "1", "--json", *extra],
        capture_output=True, text=True, timeout=duration + 60,
    )
    if out.returncode != 0 and not out.stdout:
        raise SystemExit(f"loadgen failed: {out.stderr}")
    return json.loads(out.stdout)


def rate(j):
    for k in ("rate", "rate_per_s", "requests_per_s", "ops_per_s"):
        if k in j:
            return float(j[k])
    raise SystemExit(f"no rate in loadgen JSON: {sorted(j)}")


def errors(j):
    e = j.get("errors_total")
    if e is None:
        e = sum(v for v in j.get("errors", {}).values() if isinstance(v, (int, float)))
    return int(e)


# ---------------------------------------------------------------------------
# PROXY v2 client (a connection per request), in processes of its own.

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src, sport, dst, dport):
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def connect_loop(addr, proxy, seconds, q):
    msg = b"x" * 64
    n = fails = 0
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        try:
            s = socket.create_connection(addr, timeout=5)
            head = v2_header("192.0.2.%d" % (1 + i % 250), 1024 + i % 60000, addr[0], addr[1]) if proxy else b""
            s.sendall(head + msg)
            got = b""
            while len(got) < len(msg):
                b = s.recv(len(msg) - len(got))
                if not b:
                    break
                got += b
            s.close()
            if got == msg:
                n += 1
            else:
                fails += 1
        except OSError:
            fails += 1
    q.put((n, fails))


def connect_rate(host, proxy, seconds, procs):
    port = host.proxy_port if proxy else host.echo
    q = multiprocessing.Queue()
    ticks0 = host.cpu_ticks()
    t0 = time.monotonic()
    ps = [multiprocessing.Process(target=connect_loop, args=((host.ip, port), proxy, seconds, q))
          for _ in range(procs)]
    for p in ps:
        p.start()
    res = [q.get() for _ in ps]
    for p in ps:
        p.join()
    took = time.monotonic() - t0
    ticks = host.cpu_ticks() - ticks0
    n = sum(r[0] for r in res)
    fails = sum(r[1] for r in res)
    hz = os.sysconf("SC_CLK_TCK")
    return n / took, fails, (ticks / hz) * 1e6 / max(n, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--procs", type=int, default=2, help="client processes for the PROXY connect case")
    a = ap.parse_args()
    ensure_loadgen(LOADGEN, "bench/fleet.py")
    if not os.path.exists(PREFORKD):
        raise SystemExit("no target/release/preforkd: cargo build --release")
    if subprocess.run(["sh", "-c", "command -v haproxy"], capture_output=True).returncode:
        raise SystemExit("haproxy not installed (apt-get install haproxy)")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, {os.uname().release}")
    print(f"# {subprocess.run(['haproxy', '-v'], capture_output=True, text=True).stdout.splitlines()[0]}")

    hosts = [Host(i, proxy=(i == 0)) for i in range(3)]
    lb = None
    try:
        for h in hosts:
            h.start()
        lb = Haproxy(hosts)
        for h in hosts:
            lb.wait_status("fleet3", h.name, "UP")
        lb.wait_status("fleet1", "h0", "UP")

        # 1. 3 hosts against 1, same HAProxy, interleaved.
        res = {"3 hosts": [], "1 host": []}
        for r in range(a.rounds):
            for name, port in (("3 hosts", lb.port3), ("1 host", lb.port1)):
                j = loadgen(a, "rr", port, a.conns, a.duration)
                res[name].append((rate(j), errors(j)))
        m3 = statistics.median(x[0] for x in res["3 hosts"])
        m1 = statistics.median(x[0] for x in res["1 host"])
        print(f"\n## rr -c {a.conns} through HAProxy, {a.rounds} rounds of {a.duration}s (median req/s)\n")
        print("| backend | req/s (median) | rounds | errors | ratio |")
        print("| --- | ---: | --- | ---: | ---: |")
        for name, m in (("3 hosts", m3), ("1 host", m1)):
            rounds = ", ".join(f"{x[0]:.0f}" for x in res[name])
            errs = sum(x[1] for x in res[name])
            print(f"| {name} | {m:.0f} | {rounds} | {errs} | {m / m1:.2f} |")

        # 2. PROXY v2 on against off, one host directly.
        pv = {"off": [], "v2": []}
        for r in range(a.rounds):
            for name in ("off", "v2"):
                pv[name].append(connect_rate(hosts[0], name == "v2", a.duration, a.procs))
        moff = statistics.median(x[0] for x in pv["off"])
        mv2 = statistics.median(x[0] for x in pv["v2"])
        coff = statistics.median(x[2] for x in pv["off"])
        cv2 = statistics.median(x[2] for x in pv["v2"])
        print(f"\n## a connection per request to one preforkd, {a.procs} Python client processes, "
              f"{a.rounds} rounds of {a.duration}s\n")
        print("| PROXY header | conn/s (median) | rounds | failed | server CPU µs/conn | ratio |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for name, m, c in (("none", moff, coff), ("v2 (client-written)", mv2, cv2)):
            key = "off" if name == "none" else "v2"
            rounds = ", ".join(f"{x[0]:.0f}" for x in pv[key])
            fails = sum(x[1] for x in pv[key])
            print(f"| {name} | {m:.0f} | {rounds} | {fails} | {c:.1f} | {m / moff:.3f} |")

        # 3. Rolling restart under load.
        lg = subprocess.Popen(
            [loadgen_path(), "rr", "--tcp", f"127.0.0.1:{lb.port3}", "-c", "16", "-d", "16", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        time.sleep(1)  # pacing: load under way before the first stop
        t0 = time.monotonic()
        per = []
        for h in hosts:
            t = time.monotonic()
            st = h.stop()
            if st != 0:
                raise SystemExit(f"{h.name} exited {st}")
            h.start()
            lb.wait_status("fleet3", h.name, "UP")
            per.append(time.monotonic() - t)
        total = time.monotonic() - t0
        out, _ = lg.communicate(timeout=60)
        try:
            j = json.loads(out)
            errs = f"{errors(j)} {j.get('errors')}, server_closed_idle {j.get('server_closed_idle')}"
        except ValueError:
            errs = "?"
        print("\n## rolling restart of 3 hosts under load (loadgen rr -c 16 through HAProxy)\n")
        print(f"total {total:.2f} s; per host {', '.join(f'{x:.2f} s' for x in per)}; loadgen errors {errs}")
    finally:
        if lb:
            lb.kill()
        for h in hosts:
            h.kill()


if __name__ == "__main__":
    main()
