#!/bin/sh
# The dylib plugin running examples/dylib/echo.c (built with -O2) vs the
# built-in echo: request/response rate on persistent connections (loadgen
# rr, 64-byte messages) at 8 and 64 connections, alternating A B A B.
# Usage: bench/dylib.sh [WORKERS THREADS [ROUNDS]]   (from the repo root,
# after `cargo build --release` and /work/shared/bench/setup.sh)
set -eu
W=${1:-2}; T=${2:-32}; ROUNDS=${3:-2}
LOADGEN=${LOADGEN:-/work/shared/bench/loadgen/target/release/loadgen}
BIN=${BIN:-target/release/preforkd}
CC=${CC:-cc}
dir=$(mktemp -d /tmp/pfdbench.XXXXXX)
chmod 0755 "$dir"
P1=; P2=
trap 'kill $P1 $P2 2>/dev/null; rm -rf "$dir"' EXIT
PORT1=${PORT1:-18611}; PORT2=${PORT2:-18612}
"$CC" -shared -fPIC -O2 -Iinclude -o "$dir/libecho.so" examples/dylib/echo.c
chmod 0755 "$dir/libecho.so"
cat > "$dir/builtin.toml" <<CFG
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:$PORT1"]
workers = $W
threads = $T
[service.handler]
plugin = "echo"
CFG
cat > "$dir/dylib.toml" <<CFG
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:$PORT2"]
workers = $W
threads = $T
[service.handler]
plugin = "dylib"
[service.handler.options]
path = "$dir/libecho.so"
CFG
"$BIN" -c "$dir/builtin.toml" >"$dir/log1" 2>&1 & P1=$!
"$BIN" -c "$dir/dylib.toml" >"$dir/log2" 2>&1 & P2=$!
"$LOADGEN" wait --tcp 127.0.0.1:$PORT1 >/dev/null
"$LOADGEN" wait --tcp 127.0.0.1:$PORT2 >/dev/null
echo "date: $(date -u +%FT%TZ)  preforkd ${W}x${T}, loadgen rr -d 10 --warmup 1, $(nproc) CPUs"
run() { # NAME PORT CONNS
  printf '%-14s -c %-3s ' "$1" "$3"
  "$LOADGEN" rr --tcp 127.0.0.1:$2 -c "$3" -d 10 --warmup 1 2>&1 |
    grep -E "completed|errors" | tr -s ' ' | tr '\n' ' '
  echo
}
i=0
while [ $i -lt "$ROUNDS" ]; do
  for c in 8 64; do
    run "builtin echo" $PORT1 $c
    run "dylib echo.c" $PORT2 $c
  done
  i=$((i+1))
done
