#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (FUZZ_SECONDS, default 60) with
# cargo-fuzz (libFuzzer). cargo-fuzz needs nightly features; on a stable
# toolchain RUSTC_BOOTSTRAP=1 unlocks them. New crashes are left in
# fuzz/artifacts/TARGET/; copy an input worth keeping into
# tests/fuzz-corpus/TARGET-DIR/, which `cargo test` replays
# (tests/fuzz_corpus.rs). Seeds come from that corpus too.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz (pinned)"
    cargo install --locked cargo-fuzz --version 0.12.0 || {
        echo "skipping fuzzing: cargo-fuzz could not be installed"
        exit 0
    }
fi
export RUSTC_BOOTSTRAP=1
for pair in config:config control:control metrics_head:metrics; do
    target="${pair%%:*}" corpus="../tests/fuzz-corpus/${pair##*:}"
    mkdir -p "corpus/$target"
    echo "== fuzz $target for ${seconds}s"
    cargo fuzz run "$target" "corpus/$target" "$corpus" -- \
        -max_total_time="$seconds" -max_len=4096 -timeout=5
done
