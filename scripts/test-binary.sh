#!/usr/bin/env bash
# Builds one integration-test binary without running it and prints its path:
#   scripts/test-binary.sh PACKAGE TEST [extra cargo args, e.g. --release]
# (for running tests elsewhere: in the rxe VM, on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=$1 test=$2
shift 2
bin=$(cargo test --quiet -p "$pkg" --test "$test" --no-run --message-format=json "$@" 2>/dev/null |
    python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$test")
[[ -x "$bin" ]] || { echo "could not build test $test of $pkg" >&2; exit 1; }
echo "$bin"
