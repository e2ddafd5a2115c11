#!/usr/bin/env bash
# Installs Ferry on this host: ferryd and ferry, libferry and ferry.h, the
# Python package, the systemd unit and a commented default configuration;
# creates the system user and group ferry. `--uninstall` (with the same
# directory options) removes what an install put there, and keeps the
# configuration if it was changed, and the data of disk streams.
#
#   scripts/install.sh                    # build (release) and install under /usr/local
#   systemctl daemon-reload && systemctl enable --now ferryd
#   scripts/install.sh --uninstall
#
# Options:
#   --prefix DIR       binaries, library, header, Python package (default /usr/local)
#   --sysconfdir DIR   configuration directory; ferry/ferryd.toml goes there (default /etc)
#   --unitdir DIR      where ferryd.service goes (default /etc/systemd/system)
#   --profile P        release (default) or debug: which build to install
#   --no-build         install what target/<profile> already holds
#   --no-user          do not create the ferry user and group
#   --destdir DIR      stage the files under DIR (for packaging: the paths in
#                      the unit and manifest stay the final ones; no user,
#                      no ldconfig, no systemctl)
#   --uninstall        remove an installation made with the same options
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PREFIX=/usr/local SYSCONFDIR=/etc UNITDIR=/etc/systemd/system PROFILE=release
BUILD=1 MAKE_USER=1 UNINSTALL=0 DESTDIR= KEPT=
while (($#)); do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --sysconfdir) SYSCONFDIR=$2; shift 2 ;;
        --unitdir) UNITDIR=$2; shift 2 ;;
        --profile) PROFILE=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-user) MAKE_USER=0; shift ;;
        --destdir) DESTDIR=$2; MAKE_USER=0; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PROFILE" in release|debug) ;; *) echo "install.sh: --profile must be release or debug" >&2; exit 2 ;; esac
if [[ -n "$DESTDIR" ]]; then
    ((UNINSTALL == 0)) || { echo "install.sh: --destdir stages an install; there is nothing to uninstall there" >&2; exit 2; }
    [[ "$DESTDIR" == /* ]] || { echo "install.sh: --destdir must be absolute" >&2; exit 2; }
fi
for d in "$PREFIX" "$SYSCONFDIR" "$UNITDIR"; do
    [[ "$d" == /* ]] || { echo "install.sh: $d: directories must be absolute" >&2; exit 2; }
done

log() { echo "[install] $*" >&2; }
MANIFEST="$PREFIX/share/ferry/installed-files"
CONFIG="$SYSCONFDIR/ferry/ferryd.toml"
PYVER=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo 3)
# Debian's Python reads /usr/lib/python3/dist-packages, and
# /usr/local/lib/python3.N/dist-packages.
if [[ "$PREFIX" == /usr ]]; then
    PYDIR=/usr/lib/python3/dist-packages
else
    PYDIR="$PREFIX/lib/python$PYVER/dist-packages"
fi

if ((UNINSTALL)); then
    [[ -f "$MANIFEST" ]] || { echo "install.sh: no installation under $PREFIX ($MANIFEST is missing)" >&2; exit 1; }
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]] && systemctl is-active --quiet ferryd 2>/dev/null; then
        log "stopping ferryd"
        systemctl disable --now ferryd || true
    fi
    # The config first, while the default it is compared with is there.
    if grep -qxF "$CONFIG" "$MANIFEST" && [[ -e "$CONFIG" ]]; then
        if cmp -s "$CONFIG" "$PREFIX/share/ferry/ferryd.toml.default" || cmp -s "$CONFIG" "$ROOT/deploy/ferryd.toml"; then
            rm -f "$CONFIG"
        else
            log "kept $CONFIG: it was changed since the install"
            KEPT="$CONFIG, "
        fi
    fi
    while IFS= read -r f; do
        [[ -n "$f" && "$f" != "$CONFIG" ]] || continue
        rm -f "$f"
    done < "$MANIFEST"
    rm -f "$MANIFEST"
    # Directories the install made, deepest first, if now empty.
    for d in "$PYDIR/ferry/__pycache__" "$PYDIR/ferry" "$PREFIX/share/ferry/prometheus" \
             "$PREFIX/share/ferry/grafana" "$PREFIX/share/ferry" "$PREFIX/share/doc/ferry" \
             "$PREFIX/include/ferry" "$SYSCONFDIR/ferry"; do
        rmdir "$d" 2>/dev/null || true
    done
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then systemctl daemon-reload || true; fi
    log "uninstalled from $PREFIX; kept: ${KEPT:-}the ferry user and group (userdel ferry), disk stream data (/var/lib/ferry)"
    exit 0
fi

if ((BUILD)); then
    log "building ($PROFILE)"
    flag=(); [[ "$PROFILE" == release ]] && flag=(--release)
    cargo build --quiet "${flag[@]}" -p ferry-daemon -p ferry-cli -p ferry-client
fi
T="$ROOT/target/$PROFILE"
for f in ferryd ferry libferry.so; do
    [[ -f "$T/$f" ]] || { echo "install.sh: $T/$f is missing: build first (or drop --no-build)" >&2; exit 1; }
done

if ((MAKE_USER)) && ! getent passwd ferry >/dev/null; then
    log "creating system user and group ferry"
    useradd --system --user-group --no-create-home --home-dir /var/lib/ferry --shell /usr/sbin/nologin \
        --comment "Ferry data-plane daemon" ferry
fi

installed=()
put() { # put MODE SRC DEST (DEST as installed; written under DESTDIR)
    install -D -m "$1" "$2" "$DESTDIR$3"
    installed+=("$3")
}
put 0755 "$T/ferryd" "$PREFIX/bin/ferryd"
put 0755 "$T/ferry" "$PREFIX/bin/ferry"
put 0755 "$T/libferry.so" "$PREFIX/lib/libferry.so"
put 0644 client-c/include/ferry.h "$PREFIX/include/ferry/ferry.h"
put 0644 client-c/python/ferry/__init__.py "$PYDIR/ferry/__init__.py"
# The package loads the libferry beside it first.
ln -sf "$PREFIX/lib/libferry.so" "$DESTDIR$PYDIR/ferry/libferry.so"
installed+=("$PYDIR/ferry/libferry.so")
put 0644 README.md "$PREFIX/share/doc/ferry/README.md"
# The default config, naming this install's paths.
conf=$(mktemp)
sed -e "s#/etc/ferry/ferryd.toml#$CONFIG#g" deploy/ferryd.toml > "$conf"
put 0644 "$conf" "$PREFIX/share/ferry/ferryd.toml.default"
put 0644 deploy/prometheus/ferry-rules.yml "$PREFIX/share/ferry/prometheus/ferry-rules.yml"
put 0644 deploy/grafana/ferry.json "$PREFIX/share/ferry/grafana/ferry.json"
# The unit, with this install's paths.
unit=$(mktemp)
sed -e "s#/usr/local/bin/ferryd#$PREFIX/bin/ferryd#g" \
    -e "s#/etc/ferry/ferryd.toml#$CONFIG#g" \
    -e "s#file:///usr/local/share/doc/ferry#file://$PREFIX/share/doc/ferry#g" \
    deploy/systemd/ferryd.service > "$unit"
put 0644 "$unit" "$UNITDIR/ferryd.service"
rm -f "$unit"
if [[ -e "$DESTDIR$CONFIG" ]]; then
    log "kept the existing $CONFIG (the default is $PREFIX/share/ferry/ferryd.toml.default)"
    # Listed all the same: --uninstall removes it only while it is the
    # default, and keeps it once changed.
    installed+=("$CONFIG")
else
    put 0644 "$conf" "$CONFIG"
fi
rm -f "$conf"
if [[ -z "$DESTDIR" ]] && [[ "$PREFIX/lib" == /usr/local/lib || "$PREFIX/lib" == /usr/lib ]] && command -v ldconfig >/dev/null; then
    ldconfig || true
fi
mkdir -p "$(dirname "$DESTDIR$MANIFEST")"
printf '%s\n' "${installed[@]}" > "$DESTDIR$MANIFEST"
echo "$MANIFEST" >> "$DESTDIR$MANIFEST"
if [[ -z "$DESTDIR" ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]] && [[ "$UNITDIR" == /etc/systemd/system ]]; then
    systemctl daemon-reload || true
fi
if [[ -n "$DESTDIR" ]]; then
    log "staged under $DESTDIR for $PREFIX"
    exit 0
fi
log "installed under $PREFIX (manifest: $MANIFEST)"
log "config: $CONFIG; unit: $UNITDIR/ferryd.service (systemctl enable --now ferryd)"
case ":$(python3 -c 'import sys; print(":".join(sys.path))' 2>/dev/null):" in
    *":$PYDIR:"*) ;;
    *) log "Python: add $PYDIR to PYTHONPATH to import ferry" ;;
esac
