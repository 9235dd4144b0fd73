"""What the benchmark scripts share: the project's own load generator
(bench/loadgen) and the tokio peer (bench/peers/tokio-echo), each built by
cargo when its binary is missing or older than its sources."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# The project's own load generator (bench/loadgen).
LOADGEN_CRATE = os.path.join(HERE, "loadgen")
LOADGEN = os.path.join(LOADGEN_CRATE, "target", "release", "loadgen")
# The event-driven peer server (bench/peers/tokio-echo).
TOKIO_CRATE = os.path.join(HERE, "peers", "tokio-echo")
TOKIO_ECHO = os.path.join(TOKIO_CRATE, "target", "release", "tokio-echo")


def _newest_source(crate):
    """The latest modification time of the crate's manifest, lock file and
    src/ files."""
    paths = [os.path.join(crate, f) for f in ("Cargo.toml", "Cargo.lock")]
    for root, _, files in os.walk(os.path.join(crate, "src")):
        paths += [os.path.join(root, f) for f in files]
    return max(os.path.getmtime(p) for p in paths if os.path.exists(p))


def ensure_built(binary, crate, me):
    """Build `crate` (cargo build --release) if `binary`, its output, is
    missing or older than its sources; exit with what to do on failure."""
    if os.path.exists(binary) and os.path.getmtime(binary) >= _newest_source(crate):
        return
    rel = os.path.relpath(os.path.join(crate, "Cargo.toml"), os.path.dirname(HERE))
    print(f"{me}: building {os.path.basename(binary)}: cargo build --release --manifest-path {rel}",
          file=sys.stderr)
    try:
        r = subprocess.run(["cargo", "build", "--release", "--manifest-path",
                            os.path.join(crate, "Cargo.toml")], timeout=1800)
    except FileNotFoundError:
        sys.exit(f"{me}: cargo not found; install Rust (rustup or apt-get install cargo) "
                 f"to build {rel}")
    if r.returncode != 0:
        sys.exit(f"{me}: building {rel} failed (cargo's errors above)")


def ensure_loadgen(path, me):
    """Build bench/loadgen if `path` is its binary and it is missing or
    stale; exit with what to do if another --loadgen is missing."""
    if os.path.abspath(path) != LOADGEN:
        if not os.path.exists(path):
            sys.exit(f"{me}: --loadgen {path}: no such file; leave --loadgen out to use bench/loadgen")
        return
    ensure_built(LOADGEN, LOADGEN_CRATE, me)
