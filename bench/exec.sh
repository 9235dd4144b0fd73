#!/bin/sh
# exec plugin running cat vs ucspi-tcp's tcpserver running cat: new
# connections per second (connect, one 64-byte message echoed, close).
# Usage: bench/exec.sh [WORKERS THREADS [ROUNDS]]   (after `cargo build
# --release`; tcpserver from `apt-get install ucspi-tcp`)
# Environment: DURATION (seconds per run, default 10), LOADGEN (default
# bench/loadgen's, built if missing), BIN (default target/release/preforkd),
# PORT1, PORT2 (default: free ports picked now).
set -eu
W=${1:-2}; T=${2:-8}; ROUNDS=${3:-2}
DURATION=${DURATION:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_LOADGEN=$ROOT/bench/loadgen/target/release/loadgen
LOADGEN=${LOADGEN:-$DEFAULT_LOADGEN}
BIN=${BIN:-$ROOT/target/release/preforkd}
command -v tcpserver >/dev/null || {
  echo "bench/exec.sh: tcpserver not found; install it with: apt-get install ucspi-tcp" >&2; exit 1; }
[ -x "$BIN" ] || { echo "bench/exec.sh: $BIN: no such binary; run cargo build --release first" >&2; exit 1; }
if [ ! -x "$LOADGEN" ]; then
  if [ "$LOADGEN" != "$DEFAULT_LOADGEN" ]; then
    echo "bench/exec.sh: LOADGEN=$LOADGEN: no such file; unset LOADGEN to use bench/loadgen" >&2; exit 1
  fi
  echo "bench/exec.sh: building the load generator: cargo build --release --manifest-path bench/loadgen/Cargo.toml" >&2
  cargo build --release --manifest-path "$ROOT/bench/loadgen/Cargo.toml" >&2
fi
# Two ports the kernel reports free (the same way bench/ab.py picks them).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT1=${PORT1:-$(free_port)}; PORT2=${PORT2:-$(free_port)}
dir=$(mktemp -d /tmp/pfdbench.XXXXXX)
P1=; P2=
trap 'kill $P1 $P2 2>/dev/null; rm -rf "$dir"' EXIT
trap 'exit 1' INT TERM
cat > "$dir/p.toml" <<CFG
[[service]]
name = "cat"
listen = ["tcp://127.0.0.1:$PORT1"]
workers = $W
threads = $T
[service.handler]
plugin = "exec"
[service.handler.options]
command = ["/bin/cat"]
CFG
"$BIN" -c "$dir/p.toml" >"$dir/log" 2>&1 & P1=$!
tcpserver -q -H -R -l localhost -c 40 127.0.0.1 "$PORT2" cat & P2=$!
"$LOADGEN" wait --tcp "127.0.0.1:$PORT1" --timeout-ms 20000 >/dev/null || { cat "$dir/log" >&2; exit 1; }
"$LOADGEN" wait --tcp "127.0.0.1:$PORT2" --timeout-ms 20000 >/dev/null
echo "date: $(date -u +%FT%TZ)  preforkd ${W}x${T}, tcpserver -q -H -R -l localhost -c 40, loadgen connect -c 8 -d $DURATION --warmup 1"
i=0
while [ $i -lt "$ROUNDS" ]; do
  printf 'preforkd exec cat: '; "$LOADGEN" connect --tcp "127.0.0.1:$PORT1" -c 8 -d "$DURATION" --warmup 1 | grep -E "completed|errors" | head -n 2 | tr '\n' ' '; echo
  printf 'tcpserver cat:     '; "$LOADGEN" connect --tcp "127.0.0.1:$PORT2" -c 8 -d "$DURATION" --warmup 1 | grep -E "completed|errors" | head -n 2 | tr '\n' ' '; echo
  i=$((i+1))
done
