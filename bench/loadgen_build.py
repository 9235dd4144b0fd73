"""What the benchmark scripts share: the project's own load generator
(bench/loadgen), built on first use."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# The project's own load generator (bench/loadgen), built on first use.
LOADGEN = os.path.join(HERE, "loadgen", "target", "release", "loadgen")


def ensure_loadgen(path, me):
    """Build bench/loadgen if `path` is its (missing) binary; exit with what
    to do if another --loadgen is missing."""
    if os.path.exists(path):
        return
    if os.path.abspath(path) != LOADGEN:
        sys.exit(f"{me}: --loadgen {path}: no such file; leave --loadgen out to use bench/loadgen")
    print(f"{me}: building the load generator: cargo build --release "
          "--manifest-path bench/loadgen/Cargo.toml", file=sys.stderr)
    manifest = os.path.join(HERE, "loadgen", "Cargo.toml")
    try:
        r = subprocess.run(["cargo", "build", "--release", "--manifest-path", manifest],
                           timeout=1800)
    except FileNotFoundError:
        sys.exit(f"{me}: cargo not found; install Rust (rustup or apt-get install cargo) "
                 "to build bench/loadgen")
    if r.returncode != 0:
        sys.exit(f"{me}: building bench/loadgen failed (cargo's errors above)")
