#!/usr/bin/env bash
# Tests scripts/install.sh and the systemd unit on this machine (run by
# scripts/test.sh; needs root): installs the debug build under a scratch
# prefix, checks the unit with `systemd-analyze verify`, starts the
# installed ferryd as systemd would start the unit (user ferry, the
# RuntimeDirectory /run/ferry and StateDirectory it sets up, their
# variables, a notify socket), moves a batch through it as an ordinary
# user in group ferry with no Ferry settings at all, checks that a user
# outside the group is refused, then uninstalls and checks nothing is left;
# then builds the Debian package (scripts/build-deb.sh), installs it with
# dpkg, checks it, and purges it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[[ $(id -u) -eq 0 ]] || { echo "test-install.sh needs root (it creates users and /run/ferry)" >&2; exit 1; }
W=$(mktemp -d /tmp/ferry-install.XXXXXX)
chmod 0755 "$W"
PID=
cleanup() {
    [[ -n "$PID" ]] && kill "$PID" 2>/dev/null || true
    rm -rf "$W"
    if [[ "${MADE_RUN:-0}" == 1 ]]; then rm -rf /run/ferry; fi
    if [[ "${MADE_PKG:-0}" == 1 ]]; then dpkg -P ferry >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
fail() { echo "test-install: $*" >&2; [[ -f "$W/ferryd.log" ]] && cat "$W/ferryd.log" >&2; exit 1; }

opts=(--prefix "$W/usr" --sysconfdir "$W/etc" --unitdir "$W/units")
scripts/install.sh "${opts[@]}" --no-build --profile debug
U="$W/units/ferryd.service"
grep -q "ExecStart=$W/usr/bin/ferryd --config $W/etc/ferry/ferryd.toml" "$U" || fail "the unit does not name the installed ferryd"
systemd-analyze verify "$U" || fail "systemd-analyze verify $U"
cmp -s client-c/include/ferry.h "$W/usr/include/ferry/ferry.h" || fail "ferry.h differs"
"$W/usr/bin/ferryd" --config "$W/etc/ferry/ferryd.toml" --check >/dev/null || fail "the installed config is not valid"
"$W/usr/bin/ferry" --help >/dev/null || fail "ferry --help"
PYDIR=$(ls -d "$W"/usr/lib/python3*/dist-packages)

# Started as the unit would be: systemd makes /run/ferry for User=ferry.
[[ -e /run/ferry ]] && fail "/run/ferry exists already (a ferryd runs here?): not touching it"
MADE_RUN=1
install -d -o ferry -g ferry -m 0755 /run/ferry
install -d -o ferry -g ferry -m 0750 "$W/state"
# The default config's admin endpoint, on a port of its own here.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -i "s/^http = .*/http = \"127.0.0.1:$PORT\"/" "$W/etc/ferry/ferryd.toml"
setpriv --reuid=ferry --regid=ferry --init-groups \
    env -i PATH=/usr/bin:/bin RUNTIME_DIRECTORY=/run/ferry STATE_DIRECTORY="$W/state" \
    "$W/usr/bin/ferryd" --config "$W/etc/ferry/ferryd.toml" 2> "$W/ferryd.log" &
PID=$!
for _ in $(seq 200); do [[ -S /run/ferry/ferryd.sock ]] && break; sleep 0.05; done
[[ -S /run/ferry/ferryd.sock ]] || fail "no /run/ferry/ferryd.sock"
[[ $(stat -c %G /run/ferry/ferryd.sock) == ferry ]] || fail "the socket's group is not ferry"
python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/ready', timeout=5)" ||
    fail "/ready of the installed ferryd"

# An ordinary user in group ferry: no FERRY_SOCKET, no FERRY_DAEMON_UID.
id ferry-test-member >/dev/null 2>&1 || useradd --no-create-home --shell /usr/sbin/nologin ferry-test-member
usermod -aG ferry ferry-test-member
id ferry-test-outsider >/dev/null 2>&1 || useradd --no-create-home --shell /usr/sbin/nologin ferry-test-outsider
as_user() {
    local u=$1; shift
    setpriv --reuid="$u" --regid="$u" --init-groups env -i PATH=/usr/bin:/bin HOME=/tmp PYTHONPATH="$PYDIR" "$@"
}
cat > "$W/roundtrip.py" <<'EOF'
import ferry
c = ferry.Client()
p = c.producer("installed", partitions=1, slot_size=4096, slot_count=8)
k = c.consumer("installed", "g")
p.send(b"through the installed ferryd")
b = k.next(timeout_s=10)
assert bytes(b.data) == b"through the installed ferryd", bytes(b.data)
b.release()
print("round trip ok")
EOF
chmod 0644 "$W/roundtrip.py"
as_user ferry-test-member python3 "$W/roundtrip.py" || fail "a member of group ferry could not use the installed ferryd"
# Read whole, then searched: `grep -q` may quit before ferry has written
# everything, and ferry then dies of SIGPIPE (as CLIs do), which pipefail
# would count as a failure.
st=$(as_user ferry-test-member "$W/usr/bin/ferry" status) || fail "ferry status as a member: $st"
grep -q installed <<<"$st" || fail "ferry status as a member does not list the stream: $st"
if out=$(as_user ferry-test-outsider python3 "$W/roundtrip.py" 2>&1); then
    fail "a user outside group ferry got in: $out"
fi
grep -qi "permission" <<<"$out" || fail "the outsider's error does not say why: $out"
echo "a user outside group ferry is refused: $(tail -1 <<<"$out")"

kill -TERM "$PID"
wait "$PID" || fail "ferryd did not exit cleanly on SIGTERM"
PID=
[[ -e /run/ferry/ferryd.sock ]] && fail "the socket is left after a clean exit"
# systemd removes the RuntimeDirectory when the unit stops.
rm -rf /run/ferry
MADE_RUN=0

scripts/install.sh "${opts[@]}" --uninstall
# Only the configuration is left: it was changed (the port above).
left=$(find "$W/usr" "$W/etc" "$W/units" \( -type f -o -type l \) 2>/dev/null || true)
[[ "$left" == "$W/etc/ferry/ferryd.toml" ]] || fail "left after --uninstall: $left"
# Installed twice, unchanged: the uninstall leaves no file, config included.
opts2=(--prefix "$W/again/usr" --sysconfdir "$W/again/etc" --unitdir "$W/again/units")
scripts/install.sh "${opts2[@]}" --no-build --profile debug --no-user 2>/dev/null
scripts/install.sh "${opts2[@]}" --no-build --profile debug --no-user 2>/dev/null
scripts/install.sh "${opts2[@]}" --uninstall 2>/dev/null
left=$(find "$W/again" \( -type f -o -type l \) 2>/dev/null || true)
[[ -z "$left" ]] || fail "left after installing twice and uninstalling: $left"

# The Debian package: the same files, installed and purged by dpkg.
if dpkg -s ferry >/dev/null 2>&1; then
    fail "a ferry package is installed on this machine: not touching it"
fi
DEB=$(scripts/build-deb.sh --no-build --profile debug)
MADE_PKG=1
dpkg -i "$DEB" >/dev/null || fail "dpkg -i $DEB"
v=$(/usr/bin/ferryd --version) && grep -q ferryd <<<"$v" || fail "the packaged ferryd"
systemd-analyze verify /lib/systemd/system/ferryd.service || fail "systemd-analyze verify (package)"
/usr/bin/ferryd --config /etc/ferry/ferryd.toml --check >/dev/null || fail "the packaged config"
# Debian's own Python (the package's dist-packages is its).
(cd / && /usr/bin/python3 -c 'import ferry; ferry.version()') || fail "the packaged Python package"
getent passwd ferry >/dev/null || fail "the package did not create user ferry"
dpkg -P ferry >/dev/null || fail "dpkg -P ferry"
MADE_PKG=0
for f in /usr/bin/ferryd /usr/lib/libferry.so /lib/systemd/system/ferryd.service /etc/ferry/ferryd.toml \
         /usr/lib/python3/dist-packages/ferry/__init__.py; do
    [[ -e "$f" ]] && fail "$f is left after dpkg -P"
done
rm -f "$DEB"
echo "install, unit, systemd-style start, group access, uninstall, and the Debian package: ok"
