#!/usr/bin/env python3
"""Reload benchmark: loadgen rr load against preforkd while it goes through
N reloads and M binary upgrades; reports failed requests and the time from
each command to the new generation serving.

    python3 bench/reload.py [--reloads 100] [--upgrades 5] [--workers 8]
                            [--connections 64] [--loadgen PATH]

Needs a release build (cargo build --release); the load generator is
bench/loadgen, built on first use. Everything runs in a temp dir on
127.0.0.1 with a port the kernel picks; the daemon is stopped at the end.

Two times per reload: `cli` is the wall time of `preforkd reload` (process
start, config parse, connect, wait for the answer), as an operator or
systemd's ExecReload sees it; `master` is the master's own figure, from the
request to the new generation's last worker ready (`elapsed_ms` in its
answer). Between reloads the script waits until the previous generation has
drained (a reload waits for that anyway, see README), so each figure is one
reload's own cost.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


from loadgen_build import LOADGEN, ensure_loadgen  # noqa: E402  (bench/ is on sys.path)


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reloads", type=int, default=100)
    ap.add_argument("--upgrades", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/preforkd"))
    ap.add_argument(
        "--loadgen",
        default=LOADGEN,
        help="load generator (default bench/loadgen, built if missing)",
    )
    a = ap.parse_args()
    ensure_loadgen(a.loadgen, "bench/reload.py")

    tmp = tempfile.mkdtemp(prefix="pfd-bench-")
    cfg = os.path.join(tmp, "preforkd.toml")
    with open(cfg, "w") as f:
        f.write(f"""[daemon]
pid_file = "{tmp}/preforkd.pid"
[control]
socket = "{tmp}/control.sock"
[log]
level = "warn"
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = {a.workers}
threads = {a.threads}
graceful_timeout = "10s"
[service.handler]
plugin = "echo"
""")
    log = open(os.path.join(tmp, "preforkd.log"), "w+")
    daemon = subprocess.Popen(
        [a.binary, "-c", cfg], stdout=log, stderr=log, start_new_session=True
    )
    cli = lambda *args: subprocess.run(
        [a.binary, "-c", cfg, *args], capture_output=True, text=True, timeout=120
    )
    try:
        status = None
        for _ in range(200):
            r = cli("status", "--json")
            if r.returncode == 0:
                status = json.loads(r.stdout)
                if status["state"] == "running":
                    break
            time.sleep(0.05)
        port = status["services"][0]["listeners"][0].rsplit(":", 1)[1]

        # Long enough for every reload; loadgen stops by itself.
        duration = min(300, 30 + a.reloads + 3 * a.upgrades)
        load = subprocess.Popen(
            [a.loadgen, "rr", "--tcp", f"127.0.0.1:{port}", "-c", str(a.connections),
             "-d", str(duration), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(2)

        def settled():
            for _ in range(600):
                s = json.loads(cli("status", "--json").stdout)
                gens = {w["generation"] for w in s["services"][0]["workers"]}
                if len(gens) == 1 and s["reload"]["in_progress"] is None:
                    return s
                time.sleep(0.02)
            raise SystemExit("did not settle")

        cli_ms, master_ms, upgrade_ms, failed = [], [], [], []
        every = a.reloads // a.upgrades if a.upgrades else a.reloads + 1
        for i in range(a.reloads):
            t = time.monotonic()
            r = cli("reload")
            cli_ms.append((time.monotonic() - t) * 1e3)
            if r.returncode != 0:
                failed.append(r.stderr.strip())
            else:
                m = re.search(r"took ([0-9.]+) ms", r.stdout)
                master_ms.append(float(m.group(1)))
            settled()
            if (i + 1) % every == 0 and len(upgrade_ms) < a.upgrades:
                t = time.monotonic()
                r = cli("upgrade")
                upgrade_ms.append((time.monotonic() - t) * 1e3)
                if r.returncode != 0:
                    failed.append(r.stderr.strip())
                settled()
        end_status = settled()
        out, err = load.communicate(timeout=duration + 60)
        res = json.loads(out)
    finally:
        cli("stop", "--timeout", "30s")
        try:
            os.killpg(daemon.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def line(name, v):
        return (f"| {name} | {len(v)} | {statistics.median(v):.1f} | {pct(v, 99):.1f} | "
                f"{max(v):.1f} |")

    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"workers={a.workers} threads={a.threads} loadgen rr -c {a.connections}")
    print(f"generation at the end: {end_status['generation']} "
          f"(expected {1 + a.reloads + len(upgrade_ms)})")
    print(f"failed commands: {len(failed)} {failed[:3]}")
    print("| what | n | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    print(line("reload, master (request to new generation ready)", master_ms))
    print(line("reload, `preforkd reload` wall time", cli_ms))
    if upgrade_ms:
        print(line("upgrade, `preforkd upgrade` wall time", upgrade_ms))
    keys = ["requests", "errors_total", "server_closed_idle"]
    print("loadgen:", {k: res.get(k) for k in keys}, "errors:", res.get("errors"))
    print(f"raw loadgen summary:\n{err.strip()}")


if __name__ == "__main__":
    sys.exit(main())
