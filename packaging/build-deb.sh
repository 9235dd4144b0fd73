#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks it: the paths it must
# contain (dpkg-deb --contents), its conffiles and maintainer scripts
# (dpkg-deb --info), the man pages against the CLI and the reference config, and lintian (errors and warnings fail; accepted
# findings are overridden, with a reason, in packaging/lintian-overrides).
# Installs cargo-deb (pinned) and lintian when they are missing.
# Usage: packaging/build-deb.sh   (prints the .deb's path last)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.6.0

if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    echo "== cargo install cargo-deb --locked --version $CARGO_DEB_VERSION"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
if ! command -v lintian >/dev/null 2>&1; then
    echo "== apt-get install lintian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends lintian
fi

echo "== man pages up to date with the CLI and config/preforkd.toml"
man_tmp=$(mktemp)
man5_tmp=$(mktemp)
trap 'rm -f "$man_tmp" "$man5_tmp"' EXIT
cargo run -q --example gen-man -- "$man_tmp" "$man5_tmp"
if ! cmp -s "$man_tmp" packaging/preforkd.1 || ! cmp -s "$man5_tmp" packaging/preforkd.toml.5; then
    echo "packaging/preforkd.1 or preforkd.toml.5 is stale: run cargo run --example gen-man" >&2
    exit 1
fi

echo "== packaged config validates"
cargo build -q --release
# The build host is not the target: /run/preforkd is made by the unit
# (RuntimeDirectory=) when the service starts, and [daemon] user =
# "preforkd" names a user that postinst creates. `check` verifies both
# (that a socket's directory exists, that the user does), so it checks a
# copy with the runtime directory in a temporary one, and without the
# user line where the user is missing. tests/live_systemd.rs checks the
# file as shipped, where the package made both (ExecStartPre= does on
# every start).
run_dir=$(mktemp -d)
host_cfg=$(mktemp --suffix=.toml)
trap 'rm -rf "$man_tmp" "$man5_tmp" "$host_cfg" "$run_dir"' EXIT
sed "s|/run/preforkd/|$run_dir/|g" packaging/preforkd.toml >"$host_cfg"
if ! getent passwd preforkd >/dev/null; then
    echo "(no user preforkd on this host: checking without [daemon] user)"
    sed -i '/^user = "preforkd"$/d' "$host_cfg"
fi
target/release/preforkd check -c "$host_cfg"
grep -qx 'user = "preforkd"' packaging/preforkd.toml

echo "== cargo deb"
# cargo deb prints the .deb's path on standard output (progress goes to
# standard error).
out=$(cargo deb --no-build)
echo "$out"
deb=$(grep '\.deb$' <<<"$out" | tail -n 1)
test -f "$deb"

echo "== dpkg-deb --info $deb"
info=$(dpkg-deb --info "$deb")
echo "$info"
conffiles=$(dpkg-deb --info "$deb" conffiles)
echo "conffiles: $conffiles"
grep -qx /etc/preforkd/preforkd.toml <<<"$conffiles"
grep -qx /etc/logrotate.d/preforkd <<<"$conffiles"
for script in postinst prerm postrm; do
    grep -qw "$script" <<<"$info" || { echo "missing maintainer script $script" >&2; exit 1; }
done
postinst=$(dpkg-deb --info "$deb" postinst)
grep -q 'adduser --system --group --no-create-home' <<<"$postinst"
grep -q 'deb-systemd-helper .*enable.*preforkd.service' <<<"$postinst"
grep -q 'preforkd -c /etc/preforkd/preforkd.toml upgrade' <<<"$postinst"
if grep -q 'preforkd.socket' <<<"$postinst"; then
    echo "postinst must not enable preforkd.socket (it is the admin's choice: the service binds the same port)" >&2
    exit 1
fi
grep -q 'stop preforkd.socket' <<<"$(dpkg-deb --info "$deb" prerm)"

echo "== dpkg-deb --contents $deb"
contents=$(dpkg-deb --contents "$deb")
echo "$contents"
expect() { # PATH MODE
    if ! awk -v p="${1#/}" -v m="$2" '$6 == p && $1 == m { found = 1 } END { exit !found }' <<<"$contents"; then
        echo "missing from the package, or wrong mode (want $2): $1" >&2
        exit 1
    fi
}
expect /usr/bin/preforkd -rwxr-xr-x
expect /usr/lib/systemd/system/preforkd.service -rw-r--r--
expect /lib/systemd/system/preforkd.socket -rw-r--r--
expect /etc/preforkd/preforkd.toml -rw-r--r--
expect /etc/logrotate.d/preforkd -rw-r--r--
expect /usr/share/man/man1/preforkd.1.gz -rw-r--r--
expect /usr/share/man/man5/preforkd.toml.5.gz -rw-r--r--
expect /usr/share/doc/preforkd/copyright -rw-r--r--
expect /usr/share/doc/preforkd/changelog.Debian.gz -rw-r--r--
expect /usr/share/lintian/overrides/preforkd -rw-r--r--

echo "== lintian $deb"
# --fail-on error,warning: a warning is fixed or overridden with a reason.
lintian --info --display-info --fail-on error,warning "$deb"
# For the log: the findings overridden in packaging/lintian-overrides.
# (Not in the call above: with --show-overrides, lintian 2.116 exits 2
# for overridden warnings.)
lintian --display-info --show-overrides "$deb" | grep '^O:' || true
echo "lintian: passed"
echo "$deb"
