#!/bin/sh
# exec plugin running cat vs ucspi-tcp's tcpserver running cat: new
# connections per second (connect, one 64-byte message echoed, close).
# Usage: bench/exec.sh [WORKERS THREADS [ROUNDS]]   (from the repo root,
# after `cargo build --release` and /work/shared/bench/setup.sh)
set -eu
W=${1:-2}; T=${2:-8}; ROUNDS=${3:-2}
LOADGEN=${LOADGEN:-/work/shared/bench/loadgen/target/release/loadgen}
BIN=${BIN:-target/release/preforkd}
dir=$(mktemp -d /tmp/pfdbench.XXXXXX)
trap 'kill $P1 $P2 2>/dev/null; rm -rf "$dir"' EXIT
PORT1=${PORT1:-18601}; PORT2=${PORT2:-18602}
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
tcpserver -q -H -R -l localhost -c 40 127.0.0.1 $PORT2 cat & P2=$!
"$LOADGEN" wait --tcp 127.0.0.1:$PORT1 >/dev/null
"$LOADGEN" wait --tcp 127.0.0.1:$PORT2 >/dev/null
echo "date: $(date -u +%FT%TZ)  preforkd ${W}x${T}, tcpserver -q -H -R -l localhost -c 40, loadgen connect -c 8 -d 10 --warmup 1"
i=0
while [ $i -lt "$ROUNDS" ]; do
  printf 'preforkd exec cat: '; "$LOADGEN" connect --tcp 127.0.0.1:$PORT1 -c 8 -d 10 --warmup 1 | grep -E "completed|errors" | head -n 2 | tr '\n' ' '; echo
  printf 'tcpserver cat:     '; "$LOADGEN" connect --tcp 127.0.0.1:$PORT2 -c 8 -d 10 --warmup 1 | grep -E "completed|errors" | head -n 2 | tr '\n' ' '; echo
  i=$((i+1))
done
