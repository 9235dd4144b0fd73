#!/usr/bin/env bash
# Runs tests/live_systemd.rs: the .deb installed, upgraded and purged in a
# booted Debian 12 container (systemd-nspawn). Makes the second package it
# needs, the same build with a higher version (cargo deb --deb-version), so
# that dpkg -i of it is an upgrade. The test skips, with one line, where
# debootstrap, systemd-nspawn or a bootable container are missing.
# Usage: packaging/live-systemd.sh DEB   (DEB from packaging/build-deb.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:?usage: packaging/live-systemd.sh DEB (the .deb built by packaging/build-deb.sh)}
test -f "$deb" || { echo "live-systemd.sh: no such .deb: $deb (run packaging/build-deb.sh first)" >&2; exit 1; }

# cargo deb removes the .debs in target/debian when it builds, even with
# -o elsewhere: keep a copy, and put DEB back for the caller.
dir=target/live-systemd
rm -rf "$dir"
mkdir -p "$dir"
cp "$deb" "$dir/"
version=$(dpkg-deb --field "$deb" Version)
cargo deb --no-build --deb-version "$version+live1" -o "$dir/next/" >/dev/null
test -f "$deb" || cp "$dir/$(basename "$deb")" "$deb"
next=$(ls "$dir"/next/*.deb)
echo "== tests/live_systemd.rs: $(basename "$deb"), then $(basename "$next")"
PREFORKD_LIVE_DEB="$PWD/$dir/$(basename "$deb")" PREFORKD_LIVE_DEB_NEXT="$PWD/$next" \
    cargo test --test live_systemd -- --nocapture
