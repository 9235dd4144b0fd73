#!/usr/bin/env bash
# Builds preforkd's container image from no base image: a root file system
# of the binary, the shared libraries it links (ldd) and the dynamic
# loader, /etc/passwd and /etc/group with the unprivileged user preforkd
# (uid/gid 65532), the container config (packaging/container/preforkd.toml)
# at /etc/preforkd/preforkd.toml, empty /tmp, /run/preforkd and the mount
# points /proc, /dev and /sys. No shell, no package manager, nothing else.
# Then packs it as an OCI image layout with umoci: entrypoint
# /usr/bin/preforkd -c /etc/preforkd/preforkd.toml, user 65532:65532,
# ports 8009/tcp (the echo service) and 9109/tcp (metrics and the health
# checks /ready and /live), stop signal SIGTERM. docs/DEPLOYMENT.md says how
# to run it.
#
# Usage: packaging/container/build.sh [--rootfs-only] [--binary PATH] [--out DIR]
#   --binary PATH   the preforkd to ship (default: target/release/preforkd,
#                   built with cargo build --release when not given)
#   --out DIR       where rootfs/ and oci/ go (default: target/container)
#   --rootfs-only   make DIR/rootfs and stop (no umoci needed); prints its path
# Prints the OCI layout's directory last (DIR/oci, tags VERSION and latest).
# Packing needs umoci (apt-get install umoci).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

binary=
out=$repo/target/container
rootfs_only=false
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --rootfs-only) rootfs_only=true; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    echo "== cargo build --release" >&2
    (cd "$repo" && cargo build -q --release --bin preforkd)
    binary=$repo/target/release/preforkd
fi
test -x "$binary" || { echo "build.sh: not an executable: $binary" >&2; exit 1; }
binary=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")
version=$("$binary" --version | awk '{ print $2 }')
[ -n "$version" ] || { echo "build.sh: $binary --version printed no version" >&2; exit 1; }
if ! $rootfs_only && ! command -v umoci >/dev/null 2>&1; then
    # Before any work: a missing tool is said at once, not after the rootfs.
    echo "build.sh: umoci is not installed (apt-get install umoci): it packs the OCI image; --rootfs-only makes the root file system without it" >&2
    exit 1
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
rootfs=$out/rootfs
echo "== root file system in $rootfs (preforkd $version from $binary)" >&2
rm -rf "$rootfs"
mkdir -p "$rootfs"
# Directories root-owned 0755, except the two the daemon may write as uid
# 65532: /tmp (sticky, as everywhere) and /run/preforkd (the control
# socket). Mode 1777 for both rather than a chown, so that a build as
# another user than root gives the same image.
install -d -m 0755 "$rootfs"/{usr/bin,etc/preforkd,proc,dev,sys,run}
install -d -m 1777 "$rootfs"/tmp "$rootfs"/run/preforkd
install -m 0755 "$binary" "$rootfs/usr/bin/preforkd"

# The libraries, each at the path ldd names (which is where the loader
# looks: its default directories, as there is no /etc/ld.so.cache), and
# the loader at the binary's PT_INTERP path. linux-vdso is the kernel's.
libs=$(ldd "$binary" 2>&1 || true)
if grep -q 'not a dynamic executable\|statically linked' <<<"$libs"; then
    echo "   (statically linked: no libraries)" >&2
else
    while read -r lib; do
        [ -n "$lib" ] || continue
        install -d -m 0755 "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
        chmod 0755 "$rootfs$lib"
        echo "   $lib" >&2
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$libs")
    if grep -q 'not found' <<<"$libs"; then
        echo "build.sh: ldd cannot find a library of $binary:" >&2
        echo "$libs" >&2
        exit 1
    fi
fi

# The user and group the image runs as (65532: distroless' "nonroot"
# number, clear of distributions' system and user ranges). glibc reads
# these without /etc/nsswitch.conf (its default is "files").
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/nonexistent:/nonexistent
preforkd:x:65532:65532:preforkd:/nonexistent:/nonexistent
nobody:x:65534:65534:nobody:/nonexistent:/nonexistent
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
preforkd:x:65532:
nogroup:x:65534:
EOF
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
install -m 0644 "$here/preforkd.toml" "$rootfs/etc/preforkd/preforkd.toml"

for sh in bin/sh bin/bash usr/bin/sh usr/bin/bash bin/busybox; do
    if [ -e "$rootfs/$sh" ]; then
        echo "build.sh: the image must have no shell, but has /$sh" >&2
        exit 1
    fi
done

echo "== preforkd check -c /etc/preforkd/preforkd.toml (in the root file system)" >&2
if [ "$(id -u)" = 0 ]; then
    # Inside the root: the libraries are complete and the config's paths
    # (/run/preforkd) exist there.
    chroot "$rootfs" /usr/bin/preforkd check -c /etc/preforkd/preforkd.toml >&2
else
    # No chroot without root: the host binary on a copy whose control
    # socket is in a temporary directory.
    echo "   (not root: checking a copy with the host's binary, not in a chroot)" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sed "s|/run/preforkd/|$tmp/|g" "$rootfs/etc/preforkd/preforkd.toml" >"$tmp/preforkd.toml"
    "$binary" check -c "$tmp/preforkd.toml" >&2
fi

if $rootfs_only; then
    echo "$rootfs"
    exit 0
fi

oci=$out/oci
echo "== OCI image layout in $oci (umoci $(umoci --version | awk '{ print $3 }'))" >&2
# The image's architecture is the build host's (the binary and its
# libraries are the host's).
case $(uname -m) in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) arch=$(uname -m) ;;
esac
rootless=()
[ "$(id -u)" = 0 ] || rootless=(--rootless)
rm -rf "$oci"
umoci init --layout "$oci"
umoci new --image "$oci:$version"
# One layer: the whole root file system (unpack the empty image, fill its
# bundle's rootfs, repack: the layer's entries are relative, "./etc/...").
bundle=$out/bundle
rm -rf "$bundle"
umoci unpack "${rootless[@]}" --image "$oci:$version" "$bundle" >/dev/null
cp -a "$rootfs/." "$bundle/rootfs/"
umoci repack "${rootless[@]}" --image "$oci:$version" \
    --history.created_by "packaging/container/build.sh" \
    --history.comment "preforkd $version, its libraries and /etc" \
    "$bundle"
rm -rf "$bundle"
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
umoci config --image "$oci:$version" \
    --clear config.env --clear config.cmd --clear config.entrypoint \
    --config.entrypoint /usr/bin/preforkd \
    --config.entrypoint -c \
    --config.entrypoint /etc/preforkd/preforkd.toml \
    --config.user 65532:65532 \
    --config.workingdir / \
    --config.env PATH=/usr/bin \
    --config.exposedports 8009/tcp \
    --config.exposedports 9109/tcp \
    --config.stopsignal SIGTERM \
    --config.label org.opencontainers.image.title=preforkd \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label org.opencontainers.image.description="pre-fork daemon for any socket service" \
    --config.label "org.opencontainers.image.created=$created" \
    --os linux --architecture "$arch" \
    --history.created_by "packaging/container/build.sh: umoci config"
umoci tag --image "$oci:$version" latest
umoci gc --layout "$oci"
umoci ls --layout "$oci" >&2
echo "$oci"
