"""What every benchmark shares: a cached test checkpoint, page-cache control, one fresh
subprocess per measured run, and the results table.

A benchmark script lists its contenders (``Contender``) and calls ``benchmark_main``. The
parent process prepares the checkpoint, warms the page cache and starts the script again
with ``--child NAME`` once per contender and repetition; the child builds what the timed
call needs, times only that call, reads its own peak RSS, checks the result against the
checksums saved with the checkpoint, and prints one JSON line back.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # measure this checkout's pyckpt, whatever is installed

import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_DATA_DIR = Path("/tmp/pyckpt-bench")
DP_PREFIX = "module."
TIED_NAMES = {"head.weight": "embed.weight"}  # alias -> the name that owns the storage
VOCAB = 32000
WIDTHS = (4096, 2048, 1024, 512, 256, 128)  # the widest that still gives MIN_DEPTH blocks wins
MIN_DEPTH = 4
SEED = 0
READ_BLOCK = 16 << 20
RESULT_MARKER = "BENCH_RESULT "
BASELINE_RSS_CODE = "import torch, pyckpt; print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
# The command line never imports torch, so its own baseline is a bare `import pyckpt`.
CLI_BASELINE_RSS_CODE = "import pyckpt; print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
MIB = 1 << 20
GIB = 1 << 30


# --------------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class LMConfig:
    """A GPT-style language model: fp32, tied input/output embedding."""

    vocab: int
    width: int
    depth: int

    def parameter_count(self) -> int:
        d = self.width
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        return self.vocab * d + self.depth * block + 2 * d  # the tied head adds nothing

    def nbytes(self) -> int:
        return 4 * self.parameter_count()

    @classmethod
    def for_size(cls, size_gib: float) -> LMConfig:
        """The widest model with at least MIN_DEPTH blocks and at least ``size_gib`` of weights."""
        target = size_gib * GIB
        depth = 1
        for width in WIDTHS:
            base = cls(VOCAB, width, 0).nbytes()
            block = cls(VOCAB, width, 1).nbytes() - base
            depth = max(1, math.ceil((target - base) / block))
            if depth >= MIN_DEPTH:
                return cls(VOCAB, width, depth)
        return cls(VOCAB, WIDTHS[-1], depth)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)


class LanguageModel(nn.Module):
    """Only the parameter layout matters here; the benchmarks never run it."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.width)
        self.blocks = nn.ModuleList(Block(config.width) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)
        self.head.weight = self.embed.weight


def dp_state_dict(model: nn.Module) -> dict[str, Any]:
    """``nn.DataParallel(model).state_dict()`` (``module.`` keys, its ``_metadata``) with the
    tensors left on the host: with one GPU, DataParallel would move the model to cuda:0, and
    the checkpoint would then restore onto the GPU even where a row asks for host memory."""
    wrapper = nn.Module()
    wrapper.module = model
    return wrapper.state_dict()


def build_model(config: LMConfig, device: str | torch.device = "cpu") -> LanguageModel:
    """An already-built model on ``device`` whose memory is touched (as after a real init) and
    holds NaN, so a loader that skips a tensor fails the check."""
    with torch.device("meta"):
        model = LanguageModel(config)
    model.to_empty(device=device)
    model.head.weight = model.embed.weight  # to_empty gives each module its own tensor: re-tie
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    return model


def checksum(tensor: torch.Tensor) -> int:
    """Exact sum of the tensor's 32-bit words: any wrong, shifted or missing byte changes it."""
    words = tensor.detach().contiguous().reshape(-1).view(torch.int32)
    return int(words.sum(dtype=torch.int64))


@dataclass(frozen=True)
class Checkpoint:
    """A DataParallel checkpoint and the same tensors as safetensors, with their checksums."""

    directory: Path
    config: LMConfig
    checksums: dict[str, int]  # plain (unprefixed) state-dict name -> checksum

    @property
    def pt_path(self) -> Path:
        return self.directory / "dp_model.pt"

    @property
    def safetensors_path(self) -> Path:
        return self.directory / "model.safetensors"

    @property
    def meta_path(self) -> Path:
        return self.directory / "meta.json"

    @classmethod
    def read(cls, directory: Path) -> Checkpoint:
        meta = json.loads((directory / "meta.json").read_text())
        return cls(directory, LMConfig(**meta["config"]), meta["checksums"])


def checkpoint_directory(data_dir: Path, config: LMConfig) -> Path:
    return data_dir / f"lm-{config.width}x{config.depth}"


def prepare_checkpoint(data_dir: Path, size_gib: float, with_safetensors: bool = True) -> Checkpoint:
    """The cached checkpoint of this size, generated first if missing (meta.json marks it done).

    ``with_safetensors=False`` neither needs nor writes the safetensors copy (no safetensors
    package, or no disk for a second copy)."""
    config = LMConfig.for_size(size_gib)
    directory = checkpoint_directory(data_dir, config)
    cached = Checkpoint(directory, config, {})
    needed = [cached.meta_path, cached.pt_path] + ([cached.safetensors_path] if with_safetensors else [])
    if all(path.exists() for path in needed):
        return Checkpoint.read(directory)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"generating a {config.nbytes() / GIB:.2f} GiB checkpoint in {directory} ...", flush=True)
    torch.manual_seed(SEED)
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.02)
    _atomic_write(cached.pt_path, lambda tmp: torch.save(dp_state_dict(model), tmp))

    if with_safetensors:
        from safetensors.torch import save_file

        # safetensors refuses shared tensors: the tied weight is stored once, under its owner's name.
        plain = {k: v.detach() for k, v in model.state_dict().items() if k not in TIED_NAMES}
        _atomic_write(cached.safetensors_path, lambda tmp: save_file(plain, str(tmp)))

    checksums = {name: checksum(t) for name, t in model.state_dict().items()}
    meta = {"config": asdict(config), "checksums": checksums}
    _atomic_write(cached.meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))
    return Checkpoint(directory, config, checksums)


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- checking results


def check_tensors(tensors: Mapping[str, Any], checkpoint: Checkpoint, prefix: str = "") -> list[str]:
    """Problems with ``tensors`` (keys carry ``prefix``) against the saved checksums; [] if right."""
    plain = {name.removeprefix(prefix): value for name, value in tensors.items()}
    problems = [f"missing {name}" for name in checkpoint.checksums if name not in plain]
    problems += [f"unexpected {name}" for name in plain if name not in checkpoint.checksums]
    for name, expected in checkpoint.checksums.items():
        value = plain.get(name)
        if isinstance(value, torch.Tensor) and checksum(value) != expected:
            problems.append(f"{name} differs")
    return problems


def check_model(model: nn.Module, checkpoint: Checkpoint) -> list[str]:
    problems = check_tensors(model.state_dict(), checkpoint)
    if model.get_parameter("head.weight") is not model.get_parameter("embed.weight"):
        problems.append("head.weight is no longer tied to embed.weight")
    return problems


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], checkpoint: Checkpoint, prefix: str = DP_PREFIX
) -> list[str]:
    """A loaded state dict whose keys carry ``prefix`` (DataParallel's by default; "" once
    stripped): right bytes, and the tied pair still shares storage."""
    problems = check_tensors(state_dict, checkpoint, prefix)
    for alias, owner in TIED_NAMES.items():
        a, b = state_dict.get(prefix + alias), state_dict.get(prefix + owner)
        if a is not None and b is not None and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            problems.append(f"{alias} and {owner} no longer share storage")
    return problems


# --------------------------------------------------------------------------- files


def filesystem_of(path: Path) -> str:
    """``"ext4 on /dev/vda (mounted at /)"``: the mount that holds ``path`` (longest prefix
    in /proc/self/mounts), since copy speeds depend on it (reflinks, tmpfs, ...)."""
    target = path.resolve()
    best: tuple[str, str, str] = ("/", "unknown", "unknown")
    with open("/proc/self/mounts") as f:
        for line in f:
            device, mount_point, fs_type = line.split()[:3]
            mount_point = mount_point.replace("\\040", " ")
            if target.is_relative_to(mount_point) and len(mount_point) >= len(best[0]):
                best = (mount_point, fs_type, device)
    mount_point, fs_type, device = best
    return f"{fs_type} on {device} (mounted at {mount_point})"


# --------------------------------------------------------------------------- page cache


def warm_page_cache(path: Path) -> None:
    """Read the whole file so every later reader finds it in the page cache."""
    buffer = bytearray(READ_BLOCK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def recache(paths: Sequence[Path]) -> None:
    """Drop the files' pages from the page cache and read them back, each the same way, in
    the order given, twice.

    How fast the kernel copies out of the cache depends on how a file's pages entered it (the
    writer that left them, earlier loads) and on when: here a plain pread of the shards took
    1.15-1.35x that of the pt file until all were dropped and read back alike, and then the
    file read back last was the fastest by 3-7% (2026-12-04). The second read moves every page
    to the active list, which the first reader after a single read pays for (up to 2x a warm
    load here). Layouts compared side by side must be read back alike, in alternating orders,
    or the table measures their history instead of their loaders."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    for _ in range(2):
        for path in paths:
            warm_page_cache(path)


def cached_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore on a mapping that is never touched)."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = (ctypes.c_ubyte * ((size + page - 1) // page))()
    prot_read, map_shared = 1, 1
    with open(path, "rb") as f:
        address = libc.mmap(None, size, prot_read, map_shared, f.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            if libc.mincore(address, size, resident) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
        finally:
            libc.munmap(address, size)
    return sum(byte & 1 for byte in resident) / len(resident)


# --------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Contender:
    """One row of the table.

    ``prepare`` builds what the timed call needs (untimed), ``run`` is the timed call, and
    ``check`` returns the problems with its result (untimed, after peak RSS is read).
    The row named ``baseline`` of each group is the one the group's ratios divide by.
    """

    name: str
    group: str
    run: Callable[[Checkpoint, Any], Any]
    check: Callable[[Checkpoint, Any, Any], list[str]]
    prepare: Callable[[Checkpoint], Any] = lambda checkpoint: None
    reads_safetensors: bool = False
    baseline: bool = False

    def input_path(self, checkpoint: Checkpoint) -> Path:
        return checkpoint.safetensors_path if self.reads_safetensors else checkpoint.pt_path


@dataclass
class RunResult:
    """One run of one contender in one child process."""

    seconds: float = math.nan
    peak_rss: int = 0  # bytes: high-water RSS of the timed call (model and imports included)
    rss_before: int = 0  # bytes: resident set just before the timed call
    problems: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Measurement:
    """A contender's runs, summarised: median time, worst peak, every problem seen."""

    contender: Contender
    runs: list[RunResult]

    @property
    def ok_runs(self) -> list[RunResult]:
        return [run for run in self.runs if run.error is None]

    @property
    def seconds(self) -> float:
        times = [run.seconds for run in self.ok_runs]
        return statistics.median(times) if times else math.nan

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how far to trust this row's time."""
        times = [run.seconds for run in self.ok_runs]
        return (max(times) - min(times)) / statistics.median(times) if times else math.nan

    @property
    def peak_rss(self) -> int:
        return max((run.peak_rss for run in self.ok_runs), default=0)

    @property
    def load_rss(self) -> int:
        """Peak growth during the timed call itself."""
        return max((run.peak_rss - run.rss_before for run in self.ok_runs), default=0)

    @property
    def failure(self) -> str | None:
        """Why this row cannot be trusted, or None."""
        errors = sorted({run.error for run in self.runs if run.error})
        if errors:
            return "FAILED: " + "; ".join(errors)
        problems = sorted({p for run in self.runs for p in run.problems})
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            return "WRONG RESULT: " + "; ".join(problems[:3]) + more
        return None


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Peak RSS is the kernel's high-water mark (VmHWM), reset just before the timed call.
# getrusage's ru_maxrss is no use here: a child inherits, at exec, the high-water mark of
# the parent that spawned it, and the parent has held the whole model while generating it.
def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def byte_compile_pyckpt() -> str:
    """Byte-compile pyckpt's modules, as ``pip install`` does; one header line saying so.

    A checkout installed in editable mode under PYTHONDONTWRITEBYTECODE (as on the benchmark
    machine) would otherwise compile every pyckpt module from source in every process: some
    45 ms of a first call that no installed copy pays. torch's modules came compiled."""
    import compileall

    import pyckpt

    package = Path(pyckpt.__file__).parent
    compileall.compile_dir(str(package), quiet=1)
    count = sum(1 for _ in package.rglob("*.py"))
    return f"bytecode    pyckpt's {count} modules byte-compiled before the runs, as pip install does"


def preload_imports() -> None:
    """Pay every lazy import before timing. torch pays its own at ``import torch``; pyckpt loads
    its modules and native extension on first use (tens of ms), which is no part of a load."""
    import pyckpt
    import pyckpt.index

    pyckpt.backend()
    pyckpt.load, pyckpt.load_state_dict  # noqa: B018 (attribute access imports the module)
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        pass  # only its own rows need it, and they fail loudly without it


def run_child(contender: Contender, checkpoint: Checkpoint) -> None:
    """The child's side: prepare, time the call, read peak RSS, check, print one JSON line."""
    preload_imports()
    state = contender.prepare(checkpoint)
    reset_peak_rss()
    result = RunResult(rss_before=current_rss())
    start = time.perf_counter()
    output = contender.run(checkpoint, state)
    result.seconds = time.perf_counter() - start
    result.peak_rss = peak_rss()
    result.problems = contender.check(checkpoint, state, output)
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


def spawn_child(script: Path, contender: Contender, checkpoint: Checkpoint, env: Mapping[str, str]) -> RunResult:
    command = [sys.executable, str(script), "--child", contender.name, "--checkpoint-dir", str(checkpoint.directory)]
    done = subprocess.run(command, env=dict(env), capture_output=True, text=True, cwd=REPO_ROOT)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return RunResult(**json.loads(line[len(RESULT_MARKER) :]))
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return RunResult(error=f"child exited {done.returncode}: {last}")


def baseline_rss(env: Mapping[str, str], code: str = BASELINE_RSS_CODE) -> int:
    """Peak RSS (bytes) of a fresh process that only runs ``code`` (by default: imports torch and
    pyckpt); subtracted from the rows measured in such a process."""
    done = subprocess.run(
        [sys.executable, "-c", code], env=dict(env), capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    return int(done.stdout.split()[-1]) * 1024


def measure(
    script: Path, contenders: Sequence[Contender], checkpoint: Checkpoint, repeat: int, env: Mapping[str, str]
) -> dict[str, Measurement]:
    """Every contender ``repeat`` times, round-robin so slow drifts in the machine hit all rows alike."""
    results = {c.name: Measurement(c, []) for c in contenders}
    for round_number in range(1, repeat + 1):
        for contender in contenders:
            warm_page_cache(contender.input_path(checkpoint))
            run = spawn_child(script, contender, checkpoint, env)
            results[contender.name].runs.append(run)
            status = f"{run.seconds:.3f} s" if run.error is None else run.error
            print(f"  [{round_number}/{repeat}] {contender.name}: {status}", flush=True)
    return results


# --------------------------------------------------------------------------- reporting


def machine_facts(checkpoint: Checkpoint, io_threads: int, cache_state: str, load_state: str) -> list[str]:
    import pyckpt

    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    pt_size = checkpoint.pt_path.stat().st_size
    st_size = checkpoint.safetensors_path.stat().st_size
    cfg = checkpoint.config
    return [
        f"date        {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine     {os.cpu_count()} CPUs, {mem_kib / (1 << 20):.1f} GiB RAM, {platform.platform()}",
        f"software    python {platform.python_version()}, torch {torch.__version__}, pyckpt {pyckpt.__version__} "
        f"(backend {pyckpt.backend()}, {io_threads} io threads)",
        f"checkpoint  {checkpoint.pt_path} ({pt_size / GIB:.2f} GiB; DataParallel LM width {cfg.width}, "
        f"{cfg.depth} blocks, vocab {cfg.vocab}, tied embedding)",
        f"            {checkpoint.safetensors_path} ({st_size / GIB:.2f} GiB)",
        f"page cache  {cache_state}",
        f"load        {load_state}",
    ]


def format_table(measurements: Mapping[str, Measurement], checkpoint: Checkpoint, rss_floor: int) -> list[str]:
    """Rows grouped; ratio = group baseline's median time / this row's (above 1: faster)."""
    header = ("contender", "median s", "spread", "GB/s", "vs baseline", "peak RSS MiB", "during load MiB", "check")
    rows: list[tuple[str, ...]] = []
    groups: dict[str, list[Measurement]] = {}
    for m in measurements.values():
        groups.setdefault(m.contender.group, []).append(m)
    for group, members in groups.items():
        baseline = next((m for m in members if m.contender.baseline), members[0])
        rows.append((f"[{group}; baseline: {baseline.contender.name}]",) + ("",) * (len(header) - 1))
        for m in members:
            size = m.contender.input_path(checkpoint).stat().st_size
            ratio = baseline.seconds / m.seconds
            rows.append(
                (
                    "  " + m.contender.name,
                    f"{m.seconds:.3f}",
                    f"{m.spread:.0%}",
                    f"{size / m.seconds / 1e9:.2f}",
                    "baseline" if m is baseline else f"{ratio:.2f}x",
                    f"{(m.peak_rss - rss_floor) / MIB:.0f}",
                    f"{m.load_rss / MIB:.0f}",
                    m.failure or "ok",
                )
            )
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        if not any(row[1:]):
            return row[0]
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1])]
        return "  ".join(cells + [row[-1]])

    return [line(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [line(row) for row in rows]


def wrong_rows(measurements: Mapping[str, Measurement]) -> list[str]:
    return [name for name, m in measurements.items() if m.failure]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned plain-text lines: the first column left-aligned, the last free, numbers right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1], strict=True)]
        return "  ".join(cells + [row[-1]]).rstrip()

    rule = "-" * (sum(widths[:-1]) + 2 * (len(widths) - 1) + len(header[-1]))  # the free last column aside
    return [line(header), rule] + [line(row) for row in rows]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The same rows as a GitHub markdown table (numbers right-aligned), to paste in a README."""

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    align = ["---"] + ["---:"] * (len(header) - 2) + ["---"]
    return [line(header), line(align)] + [line(row) for row in rows]


# --------------------------------------------------------------------------- entry point


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; the median is shown (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="pyckpt reader threads (PYCKPT_THREADS)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"cache (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--only", nargs="*", default=None, help="run only these contenders (by name)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def benchmark_main(
    script: Path,
    description: str,
    contenders: Sequence[Contender],
    verdict: Callable[[Mapping[str, Measurement]], str],
) -> int:
    """Run as parent (measure everything, print the table) or as a ``--child`` (one run)."""
    args = parse_args(description)
    by_name = {c.name: c for c in contenders}
    if args.child is not None:
        run_child(by_name[args.child], Checkpoint.read(args.checkpoint_dir))
        return 0

    env = dict(os.environ)
    if args.threads is not None:
        env["PYCKPT_THREADS"] = str(args.threads)
        os.environ["PYCKPT_THREADS"] = str(args.threads)  # so the header reports it
    from pyckpt._env import io_threads

    chosen = [by_name[name] for name in args.only] if args.only else list(contenders)
    checkpoint = prepare_checkpoint(args.data_dir, args.size_gib)
    inputs = sorted({c.input_path(checkpoint) for c in chosen})
    for path in inputs:
        warm_page_cache(path)
    before = ", ".join(f"{p.name} {cached_fraction(p):.0%}" for p in inputs)
    load_before = os.getloadavg()[0]
    floor = baseline_rss(env)
    print(f"baseline RSS (import torch, pyckpt): {floor / MIB:.0f} MiB; measuring {len(chosen)} contenders x {args.repeat}")
    measurements = measure(script, chosen, checkpoint, args.repeat, env)
    after = ", ".join(f"{p.name} {cached_fraction(p):.0%}" for p in inputs)

    print()
    cpus = os.cpu_count() or 1
    load_state = (
        f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"({cpus} CPUs: above {cpus} means other work competed with the runs)"
    )
    for fact in machine_facts(checkpoint, io_threads(), f"cached before: {before}; after: {after}", load_state):
        print(fact)
    print(f"each row: median of {args.repeat} fresh subprocesses; RSS above the {floor / MIB:.0f} MiB import baseline")
    print()
    for row in format_table(measurements, checkpoint, floor):
        print(row)
    print()
    wrong = wrong_rows(measurements)
    if wrong:
        print("!" * 80)
        print(f"!!! WRONG OR FAILED RESULTS in: {', '.join(wrong)}. Their times mean nothing.")
        print("!" * 80)
    print(verdict(measurements))
    return 1 if wrong else 0
