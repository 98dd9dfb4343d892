#!/usr/bin/env bash
# CI smoke run of both fuzzers, ~30 s each (FUZZ_SECONDS overrides):
#   bash tests/fuzz/smoke.sh
# Exit 0 when neither finds anything; non-zero on a crash, sanitizer report, hang, or a
# disagreement between the backends. The native fuzzer needs g++ (or clang++ with
# libFuzzer); the Python fuzzer uses atheris when it is installed, else random mutation.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${FUZZ_SECONDS:-30}"
workdir="${FUZZ_WORKDIR:-$(mktemp -d -t pyckpt-fuzz-smoke.XXXXXX)}"
status=0

echo "+ native fuzzer (${seconds}s)"
python tests/fuzz/native_fuzz.py --seconds "$seconds" --workdir "$workdir/native" || status=1

echo "+ python fuzzer (${seconds}s)"
python tests/fuzz/fuzz_load.py --seconds "$seconds" --workdir "$workdir/python" || status=1

if [ "$status" -ne 0 ]; then
  echo "fuzz smoke: FINDINGS (inputs kept under $workdir)" >&2
else
  echo "fuzz smoke: no findings"
  [ -z "${FUZZ_WORKDIR:-}" ] && rm -rf "$workdir"
fi
exit "$status"
