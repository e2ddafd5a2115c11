#!/usr/bin/env bash
# The main job: builds Ferry and runs the demo (ferryd, a C producer of
# image-like batches, a C and a Python consumer in one group). Installs what
# it needs first. Extra arguments go to scripts/demo.py (see --help), e.g.
#   scripts/demo.sh --seconds 30 --batch 32x3x224x224
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FERRY_SETUP_PYTHON=0 source scripts/setup.sh
cargo build --release --quiet -p ferry-daemon -p ferry-cli -p ferry-client
for prog in producer consumer; do
    gcc -std=c11 -O2 -Wall -Wextra -I client-c/include "client-c/examples/$prog.c" \
        -L target/release -lferry -lz -Wl,-rpath,"$ROOT/target/release" -o "target/release/demo-$prog"
done
exec python3 scripts/demo.py --bin-dir target/release "$@"
