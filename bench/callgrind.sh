#!/usr/bin/env bash
# Instructions a worker spends per echo request, counted by valgrind's
# callgrind: the same count for the same binary whatever else the machine
# is doing, so two builds compare exactly on a noisy 2-core machine (the
# wall-clock figures of bench/ab.py do not, within a few percent).
#
#   bench/callgrind.sh BINARY [BINARY ...]
#   MODE=async bench/callgrind.sh BINARY    # an async worker instead
#
# For each binary: one worker with one thread serving echo on a free
# loopback port, under callgrind; a client makes N1, then (another run) N2
# round trips of 64 bytes on one connection; the worker's instruction
# count difference over N2 - N1 is the per-request cost (start-up and exit
# cancel out). Needs valgrind and python3. Kernel time is not counted.
set -euo pipefail
n1=${N1:-2000}
n2=${N2:-12000}
case ${MODE:-threads} in
threads) pool='threads = 1' ;;
async) pool='mode = "async"' ;;
*) echo "callgrind.sh: MODE is threads or async" >&2; exit 1 ;;
esac
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 1; }

client='
import socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 120
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
msg = b"x" * 64
for _ in range(n):
    s.sendall(msg)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
s.close()
'

# Runs BINARY for N requests; prints the worker's instruction count.
count() {
    local bin n=$2 dir port pid
    # Absolute: valgrind starts it from the run's directory.
    bin=$(realpath "$1")
    dir=$(mktemp -d)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$dir/bench.toml" <<EOF
[log]
level = "warn"
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:$port"]
workers = 1
$pool
[service.handler]
plugin = "echo"
EOF
    # Default output names (callgrind.out.PID) in the run's directory: a
    # worker forked under callgrind writes its own file.
    (cd "$dir" && exec valgrind --tool=callgrind -q "$bin" -c "$dir/bench.toml" >"$dir/log" 2>&1) &
    pid=$!
    timeout 300 python3 -c "$client" "$n" "$port"
    kill -TERM "$pid"
    wait "$pid" || true
    for f in "$dir"/callgrind.out.*; do
        [ "${f##*.}" = "$pid" ] && continue # the master's
        awk '/^(summary|totals):/ {print $2; exit}' "$f"
    done
    rm -rf "$dir"
}

echo "| binary | instructions per request | runs (N1=$n1, N2=$n2) |"
echo "|---|---|---|"
for bin in "$@"; do
    a=$(count "$bin" "$n1")
    b=$(count "$bin" "$n2")
    per=$(python3 -c "print(f'{($b - $a) / ($n2 - $n1):.1f}')")
    echo "| $bin | $per | $a, $b |"
done
