#!/usr/bin/env bash
# Runs a command inside a qemu VM whose kernel has soft-RoCE: the Debian
# 6.1 kernel's rdma_rxe module, with rxe0 created on a veth device. The
# guest sees this machine's root file system read-only (9p) and chroots into
# it, so installed programs and libraries are there; an executable named by
# path (a test binary) is copied into a writable share and run from it
# (working directory /mnt/work); so does every other argument that names an
# executable file, and the programs FERRY_RXE_BINS lists (the guest finds
# them through FERRY_BIN_DIR). The share carries the log and the exit
# status back, and this script exits with the command's status.
#
#   scripts/rxe-vm.sh COMMAND [ARG...]      e.g. scripts/rxe-vm.sh ibv_devinfo
#
# Facts behind every choice here: ../shared/RXE-VM.md. The kernel package
# and the initramfs are cached in $FERRY_RXE_CACHE (default target/rxe-vm).
# The guest has no network card (-nic none); the address 192.0.2.1 (a
# documentation range) exists only inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${FERRY_RXE_CACHE:-$ROOT/target/rxe-vm}
MEM=${FERRY_RXE_MEM:-2048}
TIMEOUT=${FERRY_RXE_TIMEOUT:-900}

if (($# == 0)); then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

log() { echo "[rxe-vm] $*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

PACKAGES=(qemu-system-x86 busybox-static cpio kmod rdma-core ibverbs-providers ibverbs-utils perftest iproute2)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$CACHE"
# The kernel: whatever linux-image-amd64 points at, downloaded once.
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z "$KPKG" ]]; then
    as_root apt-get update -qq
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
KVER=${KPKG#linux-image-}
KROOT=$CACHE/$KPKG
if [[ ! -f "$KROOT/boot/vmlinuz-$KVER" ]]; then
    log "fetching $KPKG"
    rm -rf "$KROOT" "$CACHE"/*.deb
    (cd "$CACHE" && apt-get download -qq "$KPKG" 2>/dev/null)
    dpkg -x "$CACHE/${KPKG}"_*.deb "$KROOT"
    rm -f "$CACHE"/*.deb
fi

# Modules, in the order that worked (RXE-VM.md); those built into this
# kernel have no .ko and are skipped.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci 9pnet 9pnet_virtio
    netfs fscache 9p crc32_generic crc32-pclmul ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe veth)
INITRD=$CACHE/initramfs-$KVER-$(sha1sum "$0" | cut -c1-12).cpio.gz
if [[ ! -f "$INITRD" ]]; then
    log "building the initramfs"
    rm -f "$CACHE"/initramfs-*.cpio.gz
    staging=$(mktemp -d)
    mkdir -p "$staging"/{bin,dev,proc,sys,newroot,modules}
    cp /bin/busybox "$staging/bin/busybox"
    : > "$staging/modules/order"
    for m in "${MODULES[@]}"; do
        ko=$(find "$KROOT/lib/modules/$KVER" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" -o -name "${m//-/_}.ko*" \) | head -1)
        if [[ -n "$ko" ]]; then
            case "$ko" in
                *.xz) xz -dc "$ko" > "$staging/modules/$m.ko" ;;
                *.zst) zstd -qdc "$ko" > "$staging/modules/$m.ko" ;;
                *) cp "$ko" "$staging/modules/$m.ko" ;;
            esac
            echo "$m" >> "$staging/modules/order"
        fi
    done
    cat > "$staging/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko 2>/dev/null; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /newroot || { echo "rxe-vm: no host root"; poweroff -f; }
for d in proc sys dev; do mount --bind /$d /newroot/$d; done
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t 9p -o trans=virtio,version=9p2000.L share /newroot/mnt || { echo "rxe-vm: no share"; poweroff -f; }
# iproute2 from the host (busybox's ip cannot create veth devices).
chroot /newroot /bin/sh -c '
  export PATH=/usr/sbin:/usr/bin:/sbin:/bin
  ip link set lo up &&
  ip link add veth0 type veth peer name veth1 &&
  ip addr add 192.0.2.1/24 dev veth0 &&
  ip link set veth0 up && ip link set veth1 up &&
  rdma link add rxe0 type rxe netdev veth0' > /newroot/mnt/setup.log 2>&1
chroot /newroot /bin/sh -c 'cd /mnt/work && HOME=/tmp /bin/sh /mnt/run.sh' > /newroot/mnt/log 2>&1
echo $? > /newroot/mnt/rc
sync
poweroff -f
INIT
    chmod +x "$staging/init"
    (cd "$staging" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD"
    rm -rf "$staging"
fi

SHARE=$(mktemp -d /tmp/ferry-rxe.XXXXXX)
trap 'rm -rf "$SHARE"' EXIT
mkdir -p "$SHARE/work"
# The guest sees this machine's root read-only, but with its own tmpfs on
# /tmp, so a checkout under /tmp is invisible there: an executable given by
# path travels in the share and runs from there.
cmd=("$@")
for i in "${!cmd[@]}"; do
    if [[ "${cmd[$i]}" == */* && -f "${cmd[$i]}" && -x "${cmd[$i]}" ]]; then
        cp "${cmd[$i]}" "$SHARE/work/"
        cmd[$i]="/mnt/work/$(basename "${cmd[$i]}")"
    fi
done
# Programs the command starts by name from FERRY_BIN_DIR (ferryd, for
# tests that run daemons): FERRY_RXE_BINS lists them; they travel too.
if [[ -n "${FERRY_RXE_BINS:-}" ]]; then
    mkdir -p "$SHARE/work/bin"
    for b in $FERRY_RXE_BINS; do cp "$b" "$SHARE/work/bin/"; done
fi
{
    printf 'export FERRY_RXE_VM=1 RUST_BACKTRACE=1\n'
    [[ -n "${FERRY_RXE_BINS:-}" ]] && printf 'export FERRY_BIN_DIR=/mnt/work/bin\n'
    printf '%q ' "${cmd[@]}"
    echo
} > "$SHARE/run.sh"

log "booting $KVER under TCG to run: $*"
start=$(date +%s)
timeout "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m "$MEM" \
    -nographic -no-reboot -nic none -serial mon:stdio -display none \
    -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 loglevel=3" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$SHARE",mount_tag=share,security_model=none,multidevs=remap \
    > "$SHARE/console" 2>&1 || true
log "VM done in $(($(date +%s) - start)) s"
[[ -s "$SHARE/setup.log" ]] && { echo "--- rxe setup:"; cat "$SHARE/setup.log"; }
cat "$SHARE/log" 2>/dev/null || true
if [[ ! -f "$SHARE/rc" ]]; then
    echo "--- the VM did not report an exit status; its console:" >&2
    tail -40 "$SHARE/console" >&2
    exit 99
fi
exit "$(cat "$SHARE/rc")"
