#!/usr/bin/env bash
# Builds the RPM with cargo-generate-rpm (from [package.metadata.generate-rpm]
# in Cargo.toml) and checks it with Debian's rpm tools against the .deb: the
# same files (rpm -qlp), the same user and the scripts that manage the
# service (rpm -qp --scripts), the requirements (rpm -qp --requires), the
# config files marked %config(noreplace).
# Installs cargo-generate-rpm (pinned) and rpm when they are missing.
# Usage: packaging/build-rpm.sh DEB   (the .deb of packaging/build-deb.sh;
# prints the .rpm's path last)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_GENERATE_RPM_VERSION=0.21.1
deb=${1:?usage: packaging/build-rpm.sh DEB (the .deb built by packaging/build-deb.sh)}
test -f "$deb" || { echo "build-rpm.sh: no such .deb: $deb (run packaging/build-deb.sh first)" >&2; exit 1; }

if ! cargo generate-rpm --version 2>/dev/null | grep -qF "$CARGO_GENERATE_RPM_VERSION"; then
    echo "== cargo install cargo-generate-rpm --locked --version $CARGO_GENERATE_RPM_VERSION"
    cargo install cargo-generate-rpm --locked --version "$CARGO_GENERATE_RPM_VERSION"
fi
if ! command -v rpm >/dev/null 2>&1; then
    echo "== apt-get install rpm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends rpm
fi

echo "== cargo generate-rpm"
cargo build -q --release
rm -rf target/generate-rpm
cargo generate-rpm
rpm_file=$(ls target/generate-rpm/*.rpm)
test -f "$rpm_file"
fail() { echo "build-rpm.sh: $rpm_file: $*" >&2; exit 1; }

echo "== rpm -qip $rpm_file"
rpm -qip "$rpm_file"

echo "== rpm -qlp: the .deb's files"
# The two lists, normalised: the .deb's man page and changelog are gzipped
# by cargo-deb, and its socket unit is in /lib (the same directory as
# /usr/lib on merged-/usr systems). What only one of them has, by design:
# the .deb's Debian changelog and lintian overrides; the RPM's sysusers.d
# entry (Fedora makes system users from it; Debian's postinst uses adduser).
rpm_files=$(rpm -qlp "$rpm_file" | sort)
echo "$rpm_files"
deb_files=$(dpkg-deb --contents "$deb" | awk '$1 !~ /^d/ { sub(/^\.?\/?/, "/", $6); print $6 }' \
    | sed -e 's/\.gz$//' -e 's|^/lib/|/usr/lib/|' \
    | grep -v -e '^/usr/share/doc/preforkd/changelog.Debian$' -e '^/usr/share/lintian/' | sort)
rpm_only=$(comm -13 <(echo "$deb_files") <(echo "$rpm_files"))
deb_only=$(comm -23 <(echo "$deb_files") <(echo "$rpm_files"))
[ -z "$deb_only" ] || fail "missing files that the .deb has: $(echo $deb_only)"
[ "$rpm_only" = /usr/lib/sysusers.d/preforkd.conf ] || fail "files the .deb does not have: $(echo $rpm_only)"

echo "== rpm -qp --configfiles"
configs=$(rpm -qp --configfiles "$rpm_file")
echo "$configs"
grep -qx /etc/preforkd/preforkd.toml <<<"$configs" || fail "/etc/preforkd/preforkd.toml is not a config file"
grep -qx /etc/logrotate.d/preforkd <<<"$configs" || fail "/etc/logrotate.d/preforkd is not a config file"
rpm -qp --qf '[%{FILENAMES} %{FILEMODES:perms}\n]' "$rpm_file" | grep -qx '/usr/bin/preforkd -rwxr-xr-x' \
    || fail "/usr/bin/preforkd is missing or not mode 755"

echo "== rpm -qp --scripts"
scripts=$(rpm -qp --scripts "$rpm_file")
echo "$scripts"
# The .deb's user: system user and group preforkd, home /nonexistent, not
# created, no login shell (adduser --system --group --no-create-home).
grep -q 'useradd -r -U -M -d /nonexistent -s /usr/sbin/nologin .* preforkd' <<<"$scripts" \
    || fail "the preinstall script does not create the preforkd system user"
dpkg-deb --info "$deb" postinst | grep -q 'adduser --system --group --no-create-home --home /nonexistent' \
    || fail "the .deb's postinst no longer makes the user this script compares with"
grep -q '^u preforkd - .* /nonexistent /usr/sbin/nologin$' packaging/preforkd.sysusers \
    || fail "packaging/preforkd.sysusers differs from the useradd line"
# As in the .deb: a hot binary upgrade of a running service on upgrade
# (restart if it fails), stop and disable on erase.
grep -q 'preforkd -c /etc/preforkd/preforkd.toml upgrade' <<<"$scripts" \
    || fail "the postinstall script does not upgrade the running master"
grep -q 'systemctl --no-reload disable --now preforkd.service preforkd.socket' <<<"$scripts" \
    || fail "the preuninstall script does not stop the service and socket"

echo "== rpm -qp --requires"
requires=$(rpm -qp --requires "$rpm_file")
echo "$requires"
grep -q '^/usr/sbin/useradd' <<<"$requires" || fail "does not require /usr/sbin/useradd"
echo "rpm: passed"
echo "$rpm_file"
