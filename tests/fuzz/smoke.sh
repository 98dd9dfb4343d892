#!/usr/bin/env bash
# CI smoke run of both fuzzers:
#   bash tests/fuzz/smoke.sh
# Exit 0 when neither finds anything; non-zero on a crash, sanitizer report, hang, or a
# disagreement between the backends. The native fuzzer needs g++ (or clang++ with
# libFuzzer); the Python fuzzer uses atheris when it is installed, else random mutation.
#
# A CI run must fail for what changed in the code, not for the dice: the smoke starts from
# the generated seeds alone, with a fixed random seed and a fixed number of inputs
# (FUZZ_SEED, FUZZ_NATIVE_RUNS, FUZZ_PYTHON_RUNS), so it walks nearly the same inputs each
# time (coverage feedback and a few seeds that hold memory addresses still vary it a little).
# FUZZ_SECONDS caps each fuzzer's time on a slow machine. Exploring is the long runs' job
# (tests/fuzz/fuzz_load.py --seconds 600, tests/fuzz/native_fuzz.py --seconds 600).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${FUZZ_SECONDS:-90}"
seed="${FUZZ_SEED:-20261205}"
native_runs="${FUZZ_NATIVE_RUNS:-120000}"
python_runs="${FUZZ_PYTHON_RUNS:-30000}"
workdir="${FUZZ_WORKDIR:-$(mktemp -d -t pyckpt-fuzz-smoke.XXXXXX)}"
export PYTHONHASHSEED=0
status=0

echo "+ native fuzzer (seed $seed, $native_runs inputs, at most ${seconds}s)"
python tests/fuzz/native_fuzz.py --seed "$seed" --runs "$native_runs" --seconds "$seconds" \
  --workdir "$workdir/native" || status=1

echo "+ python fuzzer (seed $seed, $python_runs inputs, at most ${seconds}s)"
python tests/fuzz/fuzz_load.py --seed "$seed" --runs "$python_runs" --seconds "$seconds" \
  --workdir "$workdir/python" || status=1

if [ "$status" -ne 0 ]; then
  echo "fuzz smoke: FINDINGS (inputs kept under $workdir)" >&2
else
  echo "fuzz smoke: no findings"
  [ -z "${FUZZ_WORKDIR:-}" ] && rm -rf "$workdir"
fi
exit "$status"
