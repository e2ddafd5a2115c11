#!/usr/bin/env bash
# Builds a Debian package of Ferry from the release build:
# target/debian/ferry_<version>_<arch>.deb, staged with
# `scripts/install.sh --destdir` (so it holds exactly what install.sh
# installs): /usr/bin/ferryd and ferry, /usr/lib/libferry.so,
# /usr/include/ferry/ferry.h, the Python package, the systemd unit in
# /lib/systemd/system, and /etc/ferry/ferryd.toml as a conffile. Its
# maintainer scripts create the system user and group ferry, and stop
# ferryd before removal.
#
#   scripts/build-deb.sh [--no-build] [--profile debug]
#   dpkg -i target/debian/ferry_*.deb && systemctl enable --now ferryd
set -euo pipefail
cd "$(dirname "$0")/.."
pass=()
while (($#)); do
    case "$1" in
        --no-build) pass+=(--no-build); shift ;;
        --profile) pass+=(--profile "$2"); shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-deb.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
OUT="$PWD/target/debian"
STAGE="$OUT/ferry_${VERSION}_${ARCH}"
rm -rf "$STAGE"
mkdir -p "$STAGE"
scripts/install.sh --prefix /usr --sysconfdir /etc --unitdir /lib/systemd/system --destdir "$STAGE" "${pass[@]}"
# dpkg keeps the list of files itself.
rm -f "$STAGE/usr/share/ferry/installed-files"
mkdir -p "$STAGE/DEBIAN"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: ferry
Version: $VERSION
Architecture: $ARCH
Maintainer: Ferry developers <ferry@localhost>
Installed-Size: $SIZE
Depends: libc6, libgcc-s1, libhwloc15, libudev1, adduser
Recommends: python3
Suggests: rdma-core, prometheus
Section: net
Priority: optional
Description: data-plane daemon that moves training batches to GPUs
 ferryd runs one per GPU host: it moves training batches and gradients
 between hosts over RDMA verbs (or TCP) and hands them to training
 processes through shared-memory rings. Includes the ferry CLI, libferry
 (C ABI, ferry.h) and its Python package, and a systemd unit.
CONTROL
echo /etc/ferry/ferryd.toml > "$STAGE/DEBIAN/conffiles"
cat > "$STAGE/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd ferry >/dev/null; then
        adduser --system --group --no-create-home --home /var/lib/ferry --shell /usr/sbin/nologin ferry >/dev/null
    fi
    ldconfig
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
POSTINST
cat > "$STAGE/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop ferryd || true
fi
PRERM
cat > "$STAGE/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = purge ]; then
    ldconfig
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
POSTRM
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
dpkg-deb --root-owner-group --build "$STAGE" "$OUT/ferry_${VERSION}_${ARCH}.deb" >/dev/null
rm -rf "$STAGE"
echo "$OUT/ferry_${VERSION}_${ARCH}.deb"
