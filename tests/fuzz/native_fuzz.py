"""Build and run the native fuzzer (csrc/fuzz/fuzz_index.cpp) under ASan + UBSan.

One-line command (from the repository root), 60 seconds by default:

    python tests/fuzz/native_fuzz.py --seconds 60

It compiles the zip index and the pickle VM (csrc/core, csrc/index) with the harness into
``build/fuzz/native/`` (no torch, no Python in the fuzzed process) and runs it on a corpus
seeded with small torch checkpoints, their ``data.pkl`` files and the small hostile cases
of ``tests/attacks.py``. Engines: libFuzzer when ``clang++`` can link ``-fsanitize=fuzzer``
(``apt-get install clang-14 libclang-rt-14-dev``), else the self-contained coverage-guided
driver ``csrc/fuzz/driver.cpp`` built with g++ (``--engine gcc`` forces it).

Exit status: 0 when the run found nothing, 1 when it found a crash, sanitizer report,
timeout or out-of-memory (the input is saved under ``build/fuzz/native/artifacts/``; replay
it with ``python tests/fuzz/native_fuzz.py --replay FILE``), 2 when the build failed.

Other options: ``--engine {auto,libfuzzer,gcc}``, ``--seed N``, ``--runs N``, ``--max-len N``,
``--workdir DIR``, ``--fresh`` (start from the seeds only, dropping the saved corpus).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
DICT = os.path.join(HERE, "pickle_zip.dict")
CORE_SOURCES = ["core/byte_source.cpp", "index/zip_index.cpp", "index/pickle_vm.cpp", "index/json_value.cpp",
                "index/safetensors_index.cpp"]
HARNESS = "fuzz/fuzz_index.cpp"
DRIVER = "fuzz/driver.cpp"
COMMON_FLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-I", CSRC]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
ARTIFACT_KINDS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def _find_clang() -> str | None:
    for name in ("clang++", "clang++-18", "clang++-17", "clang++-16", "clang++-15", "clang++-14"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, **kwargs)


def _sources(names: list[str]) -> list[str]:
    return [os.path.join(CSRC, name) for name in names]


def _newer(target: str, inputs: list[str]) -> bool:
    if not os.path.exists(target):
        return False
    built = os.path.getmtime(target)
    return all(os.path.getmtime(p) <= built for p in inputs)


def _all_inputs() -> list[str]:
    headers = glob.glob(os.path.join(CSRC, "core", "*.h")) + glob.glob(os.path.join(CSRC, "index", "*.h"))
    return _sources(CORE_SOURCES + [HARNESS, DRIVER]) + headers + [os.path.abspath(__file__)]


def build_libfuzzer(workdir: str, clang: str) -> str | None:
    binary = os.path.join(workdir, "fuzz_index_libfuzzer")
    if _newer(binary, _all_inputs()):
        return binary
    command = [clang, *COMMON_FLAGS, "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
               *_sources(CORE_SOURCES + [HARNESS]), "-o", binary]
    result = _run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(f"libFuzzer build failed ({' '.join(command)}):\n{result.stderr[-4000:]}\n")
        return None
    return binary


def build_gcc(workdir: str) -> str | None:
    binary = os.path.join(workdir, "fuzz_index_gcc")
    if _newer(binary, _all_inputs()):
        return binary
    compiler = os.environ.get("CXX") or shutil.which("g++") or "c++"
    objects = []
    for name in CORE_SOURCES + [HARNESS, DRIVER]:
        obj = os.path.join(workdir, "obj", name.replace("/", "_") + ".o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        coverage = [] if name == DRIVER else ["-fsanitize-coverage=trace-pc"]
        command = [compiler, *COMMON_FLAGS, *SANITIZE, *coverage, "-c", os.path.join(CSRC, name), "-o", obj]
        result = _run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(f"build failed ({' '.join(command)}):\n{result.stderr[-4000:]}\n")
            return None
        objects.append(obj)
    command = [compiler, *SANITIZE, *objects, "-o", binary]
    result = _run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(f"link failed ({' '.join(command)}):\n{result.stderr[-4000:]}\n")
        return None
    return binary


def build(workdir: str, engine: str) -> tuple[str, str] | None:
    os.makedirs(workdir, exist_ok=True)
    if engine in ("auto", "libfuzzer"):
        clang = _find_clang()
        if clang is not None:
            binary = build_libfuzzer(workdir, clang)
            if binary is not None:
                return binary, "libfuzzer"
        if engine == "libfuzzer":
            sys.stderr.write("libFuzzer is not available (no clang++ that links -fsanitize=fuzzer)\n")
            return None
    binary = build_gcc(workdir)
    return (binary, "gcc") if binary is not None else None


def _environment(engine: str) -> dict[str, str]:
    env = dict(os.environ)
    asan = "detect_leaks=1:abort_on_error=0:symbolize=1:handle_abort=0"
    if engine == "gcc":
        # The driver has no -malloc_limit_mb: ASan reports any single allocation over 1 GiB.
        asan += ":max_allocation_size_mb=1024:allocator_may_return_null=0"
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", asan)
    env["UBSAN_OPTIONS"] = env.get("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


def _artifacts(directory: str) -> set[str]:
    return {p for p in glob.glob(os.path.join(directory, "*")) if os.path.basename(p).startswith(ARTIFACT_KINDS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--engine", choices=["auto", "libfuzzer", "gcc"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0: fresh each run)")
    parser.add_argument("--runs", type=int, default=0,
                        help="stop after this many inputs (0: run for --seconds); with --seed, a "
                             "run from the seeds alone repeats itself")
    parser.add_argument("--max-len", type=int, default=64 << 10)
    parser.add_argument("--workdir", default=os.path.join(ROOT, "build", "fuzz", "native"))
    parser.add_argument("--fresh", action="store_true", help="drop the saved corpus first")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs once and exit")
    parser.add_argument("--no-seeds", action="store_true", help="do not (re)generate the torch seeds")
    args = parser.parse_args(argv)

    workdir = os.path.abspath(args.workdir)
    built = build(workdir, args.engine)
    if built is None:
        return 2
    binary, engine = built
    env = _environment(engine)
    if args.replay:
        result = _run([binary, *[os.path.abspath(p) for p in args.replay]], env=env)
        return 0 if result.returncode == 0 else 1

    corpus = os.path.join(workdir, "corpus")
    seeds = os.path.join(workdir, "seeds")
    artifacts = os.path.join(workdir, "artifacts")
    if args.fresh:
        shutil.rmtree(corpus, ignore_errors=True)
    for directory in (corpus, seeds, artifacts):
        os.makedirs(directory, exist_ok=True)
    if not args.no_seeds or not os.listdir(seeds):
        sys.path.insert(0, HERE)
        import seeds as seed_module

        count = seed_module.write_seeds(seeds)
        print(f"native fuzz: {count} seeds in {seeds}")
    before = _artifacts(artifacts)
    command = [
        binary,
        f"-max_total_time={max(1, int(args.seconds))}",
        f"-max_len={args.max_len}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        f"-dict={DICT}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        *([f"-seed={args.seed}"] if args.seed else []),
        *([f"-runs={args.runs}"] if args.runs else []),
        corpus,
        seeds,
    ]
    if engine == "libfuzzer":
        command.insert(1, "-malloc_limit_mb=1024")
    print(f"native fuzz ({engine}): {' '.join(command)}", flush=True)
    started = time.monotonic()
    result = _run(command, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    log = result.stdout + result.stderr
    with open(os.path.join(workdir, "last_run.log"), "w") as f:
        f.write(log)
    runs = re.findall(r"Done (\d+) runs in", log)
    executions = int(runs[-1]) if runs else _last_exec_count(log)
    found = sorted(_artifacts(artifacts) - before)
    print(f"native fuzz ({engine}): {executions} executions in {elapsed:.0f} s, exit {result.returncode}, "
          f"corpus {len(os.listdir(corpus))} files")
    if result.returncode != 0 or found:
        sys.stdout.write(log[-6000:])
        for path in found:
            print(f"native fuzz: FINDING saved to {path}")
        return 1
    print("native fuzz: no findings")
    return 0


def _last_exec_count(log: str) -> int:
    counts = re.findall(r"#(\d+)", log)
    return int(counts[-1]) if counts else 0


if __name__ == "__main__":
    sys.exit(main())
