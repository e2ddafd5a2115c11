#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian 12, and only
# what is missing: Debian packages with apt, Python packages with pip (or
# apt when pip cannot). Safe to run again. Sourced by demo.sh and test.sh.
set -euo pipefail

# cmake, clang and libclang-dev build rdma-mummy-sys (the verbs crate's
# rdma-core binding, loaded at run time); protobuf-compiler builds the
# etcd-client crate. prometheus, etcd-server and systemd (systemd-analyze)
# are the real components the operations tests run against.
APT_PACKAGES=(build-essential pkg-config zlib1g-dev python3 cmake clang libclang-dev libhwloc-dev libudev-dev
    iproute2 redis-server nats-server prometheus systemd etcd-server protobuf-compiler adduser)

log() { echo "[setup] $*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

missing_apt=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing_apt+=("$p")
done
if ((${#missing_apt[@]})); then
    log "installing Debian packages: ${missing_apt[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        log "cargo not found: Ferry needs a Rust toolchain (1.89 or newer) on PATH"
        exit 1
    fi
fi

pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

# Python packages for the tests and the demo (NumPy is optional for users,
# but the tests exercise the NumPy path).
if [[ "${FERRY_SETUP_PYTHON:-1}" == 1 ]]; then
    if ! python3 -c 'import pytest, numpy' >/dev/null 2>&1; then
        log "installing Python packages: pytest numpy"
        if ! python3 -m pip install --quiet --disable-pip-version-check pytest numpy 2>/dev/null &&
           ! python3 -m pip install --quiet --disable-pip-version-check --break-system-packages pytest numpy 2>/dev/null; then
            as_root apt-get update -qq
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-pytest python3-numpy
        fi
    fi
fi

# PyTorch, for the tests of the PyTorch paths (scripts/test.sh asks for it
# with FERRY_SETUP_TORCH=1). The wheel from PyPI (it brings the CUDA
# libraries along, some GiB) is downloaded once into target/python-wheels
# and installed from there on later runs.
if [[ "${FERRY_SETUP_TORCH:-0}" == 1 ]] && ! python3 -c 'import torch' >/dev/null 2>&1; then
    wheels="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/python-wheels"
    mkdir -p "$wheels"
    if ! pip_install --no-index --find-links "$wheels" torch; then
        log "downloading PyTorch from PyPI into $wheels (once)"
        python3 -m pip download --quiet --disable-pip-version-check --dest "$wheels" torch
        pip_install --no-index --find-links "$wheels" torch
    fi
    python3 -c 'import torch' || { log "PyTorch did not install"; exit 1; }
fi
