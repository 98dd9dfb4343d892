"""Distributed load benchmark: one DataParallel checkpoint (>= 2 GiB) loaded by 1, 2 and 4 ranks.

    python benchmarks/bench_distributed.py [--size-gib 2] [--world-sizes 1 2 4] [--cache both]
                                           [--rows KEY ...] [--repeat 1] [--backend gloo|nccl]

Every rank of a group loads the same checkpoint on the same machine, the way a job started by
torchrun does, for two kinds of target:

- a plain model that every rank holds whole (DDP): cooperative ``pyckpt.load_state_dict(...,
  process_group=...)``, where each rank reads about 1/N of the bytes and the ranks share them
  by broadcast, against every rank reading the whole file (pyckpt, or torch.load +
  load_state_dict) and against rank 0 reading it and broadcasting every tensor;
- a model sharded by FSDP2 (``fully_shard``: DTensor parameters): pyckpt reading only each
  rank's shard, against torch's recipe (rank 0 maps the file, ``set_model_state_dict`` with
  ``broadcast_from_rank0``).

What is measured, per rank, around the one timed call (the model and the group are built
before; the result is checked after):

- wall time. The job waits for its slowest rank, so a row's time is the slowest rank's;
- bytes read, as the growth of ``rchar`` in /proc/self/io: what the rank's read()/pread()
  calls returned. It counts file reads but not gloo's socket traffic (a rank that only
  receives broadcasts shows ~100 bytes), nor pages faulted in through a mapping
  (torch.load(mmap=True): that row is marked);
- bytes from disk (``read_bytes``, same file): nonzero on a cold cache, and on a warm one
  only if memory pressure evicted the file.

The numbers that matter are the ratios between rows at one world size and how bytes per
rank shrink with N; absolute times move a lot on a shared VM. Every row is verified after
timing: the replicated models against the checksums saved with the checkpoint (on every
rank), the sharded ones shard by shard against the same slice of the file
(``torch.load(mmap=True)``), and against the checksums too at world size 1.

One spawn (``torch.multiprocessing``) per world size runs every row, cache state and
repetition in sequence, with barriers between them. Before each row rank 0 warms the page
cache or drops it (``sync; echo 3 > /proc/sys/vm/drop_caches``), and decides whether the
row fits in MemAvailable; a row that does not is skipped with its reason, not run into OOM.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from common import (
    DEFAULT_DATA_DIR,
    DP_PREFIX,
    GIB,
    MIB,
    Checkpoint,
    LanguageModel,
    LMConfig,
    build_model,
    cached_fraction,
    check_model,
    check_tensors,
    dp_state_dict,
    markdown_table,
    prepare_checkpoint,
    preload_imports,
    warm_page_cache,
)

DEFAULT_WORLD_SIZES = (1, 2, 4)
CACHE_STATES = ("warm", "cold")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
SPAWN_TIMEOUT_S = 1800  # per --repeat, one world size, every row: a rank stuck in a collective ends here
COLLECTIVE_TIMEOUT_S = 900  # a rank whose peer died raises after this instead of waiting forever
MEMORY_MARGIN = 1 * GIB  # left free beyond a row's estimate: the kernel, other processes
STAGING_PER_RANK = 256 * MIB  # pyckpt's buffers: group broadcasts (4 x 32 MiB), small staged tensors
BASELINE_ROW = "torch-each"
WARM_UP_CONFIG = LMConfig(vocab=512, width=64, depth=2)  # the same layout, tiny: ~0.5 MB


# --------------------------------------------------------------------------- /proc


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io: rchar (bytes returned by read calls), read_bytes (from disk)."""
    with open("/proc/self/io") as f:
        return {name: int(value) for name, value in (line.split(":") for line in f)}


def meminfo(field_name: str) -> int:
    """A /proc/meminfo line, in bytes."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field_name + ":"))


def drop_page_cache() -> str | None:
    """Write back dirty pages and drop the whole page cache; why not, or None."""
    os.sync()
    try:
        DROP_CACHES.write_text("3")
    except OSError as exc:
        return f"cannot write {DROP_CACHES} ({exc.strerror or exc})"
    return None


def warm(path: Path) -> None:
    """Read the file through unless it is (almost) all cached: checking is cheaper than reading."""
    if cached_fraction(path) < 0.99:
        warm_page_cache(path)


# --------------------------------------------------------------------------- what a rank holds


@dataclass(frozen=True)
class SpawnPlan:
    """What every rank of one spawn runs: rows x cache states x repetitions, in that nesting."""

    world: int
    port: int
    backend: str
    checkpoint_dir: Path
    warm_up_dir: Path  # a tiny checkpoint each rank loads once per row, untimed, first
    results_dir: Path
    row_keys: tuple[str, ...]
    cache_states: tuple[str, ...]
    repeat: int


@dataclass
class Rank:
    """One rank's lasting state: the group, its device, the checkpoint, and what it builds once."""

    index: int
    world: int
    device: torch.device
    checkpoint: Checkpoint
    replicated: nn.Module | None = None  # built at the first replicated row, refilled before each
    _mesh: Any = None

    @property
    def path(self) -> Path:
        return self.checkpoint.pt_path

    @property
    def mesh(self) -> Any:
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill_nan(model: nn.Module) -> None:
    """Poison every parameter (the local shard of a DTensor), so a loader that skips one fails the check."""
    with torch.no_grad():
        for parameter in model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            local.fill_(float("nan"))


def replicated_model(rank: Rank) -> nn.Module:
    """The rank's whole model, built once per spawn (build_model touches its memory) and
    poisoned again before every row that reuses it."""
    if rank.replicated is None:
        rank.replicated = build_model(rank.checkpoint.config, rank.device)
    else:
        fill_nan(rank.replicated)
    return rank.replicated


def fsdp2_model(rank: Rank) -> nn.Module:
    """FSDP2's own recipe for a model too big for one rank: built on the meta device, each block
    and the root ``fully_shard``-ed, then ``to_empty`` allocates only this rank's shards. (A
    model built whole first would hold N more full copies at once, which this machine lacks.)"""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = LanguageModel(rank.checkpoint.config)  # ties head.weight to embed.weight
    for block in model.blocks:
        fully_shard(block, mesh=rank.mesh)
    fully_shard(model, mesh=rank.mesh)  # embed and head share one sharded parameter here
    model.to_empty(device=rank.device)
    fill_nan(model)
    return model


def strip_dp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    consume_prefix_in_state_dict_if_present(state_dict, DP_PREFIX)
    return state_dict


# --------------------------------------------------------------------------- the timed calls


def pyckpt_group(rank: Rank, model: nn.Module) -> None:
    import pyckpt

    pyckpt.load_state_dict(model, rank.path, process_group=dist.group.WORLD)


def pyckpt_alone(rank: Rank, model: nn.Module) -> None:
    import pyckpt

    pyckpt.load_state_dict(model, rank.path)


def torch_load_into(rank: Rank, model: nn.Module) -> None:
    state_dict = torch.load(rank.path, map_location=rank.device, weights_only=True)
    model.load_state_dict(strip_dp_prefix(state_dict))


def torch_rank0_broadcast(rank: Rank, model: nn.Module) -> None:
    """What DDP users write: rank 0 loads, then one broadcast per tensor (the tied weight once)."""
    if rank.index == 0:
        torch_load_into(rank, model)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.detach(), src=0)


def torch_fsdp2_recipe(rank: Rank, model: nn.Module) -> None:
    """torch's documented way to load a full checkpoint into FSDP2: rank 0 maps the file, the
    others pass {}, and set_model_state_dict broadcasts each tensor and keeps every rank's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state_dict = strip_dp_prefix(torch.load(rank.path, mmap=True, weights_only=True)) if rank.index == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state_dict, options=options)


# --------------------------------------------------------------------------- checks (untimed)


def tie_problems(model: nn.Module) -> list[str]:
    if model.get_parameter("head.weight") is not model.get_parameter("embed.weight"):
        return ["head.weight is no longer tied to embed.weight"]
    return []


def check_replicated(rank: Rank, model: nn.Module) -> list[str]:
    return check_model(model, rank.checkpoint)


def check_sharded(rank: Rank, model: nn.Module) -> list[str]:
    """Each local shard against the same box of the file's tensor (mapped: only this rank's
    pages are touched). full_tensor() would all-gather the whole model onto every rank."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    reference = strip_dp_prefix(torch.load(rank.path, mmap=True, weights_only=True))
    state = model.state_dict()
    problems = [f"missing {name}" for name in rank.checkpoint.checksums if name not in state]
    problems += [f"unexpected {name}" for name in state if name not in rank.checkpoint.checksums]
    locals_: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name not in reference:
            continue
        expected = reference[name]
        if isinstance(value, DTensor):
            shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
            expected = expected[tuple(slice(start, start + size) for start, size in zip(offset, shape))]
            value = value.to_local()
        locals_[name] = value
        if value.shape != expected.shape or not torch.equal(value.detach().cpu(), expected):
            problems.append(f"{name} differs from its slice of the file")
    if rank.world == 1:  # the one shard is the whole tensor: the saved checksums apply too
        problems += check_tensors(locals_, rank.checkpoint)
    return problems + tie_problems(model)


# --------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row:
    key: str  # for --rows
    label: str  # in the table
    explanation: str  # one line of --help
    prepare: Callable[[Rank], nn.Module]
    load: Callable[[Rank, nn.Module], None]
    check: Callable[[Rank, nn.Module], list[str]]
    # Memory the row adds, all ranks together, on top of what the spawn already holds:
    # (file bytes, model bytes, world) -> bytes.
    extra_memory: Callable[[int, int, int], int]
    reads_mapped: bool = False  # reads by page faults, which rchar does not count

    @property
    def replicated(self) -> bool:
        return self.prepare is replicated_model


ROWS: tuple[Row, ...] = (
    Row(
        "pyckpt-group",
        "pyckpt group",
        "pyckpt.load_state_dict(model, f, process_group=WORLD): each rank reads ~1/N, broadcasts share the rest",
        replicated_model,
        pyckpt_group,
        check_replicated,
        lambda file, model, world: world * STAGING_PER_RANK,
    ),
    Row(
        "pyckpt-each",
        "pyckpt each rank",
        "pyckpt.load_state_dict(model, f) on every rank by itself: every rank reads the whole file",
        replicated_model,
        pyckpt_alone,
        check_replicated,
        lambda file, model, world: world * STAGING_PER_RANK,
    ),
    Row(
        BASELINE_ROW,
        "torch each rank",
        "baseline: every rank torch.load(f, weights_only=True) (eager), strip 'module.', model.load_state_dict",
        replicated_model,
        torch_load_into,
        check_replicated,
        lambda file, model, world: world * file,
    ),
    Row(
        "torch-bcast",
        "torch rank0 + broadcast",
        "rank 0 does the torch recipe, then dist.broadcast of every parameter and buffer from rank 0",
        replicated_model,
        torch_rank0_broadcast,
        check_replicated,
        lambda file, model, world: file,
    ),
    Row(
        "pyckpt-fsdp2",
        "pyckpt FSDP2 shards",
        "fully_shard(model) on a device mesh, then pyckpt.load_state_dict(model, f): each rank reads its shards",
        fsdp2_model,
        pyckpt_alone,
        check_sharded,
        lambda file, model, world: model + world * STAGING_PER_RANK,
    ),
    Row(
        "torch-fsdp2",
        "torch FSDP2 recipe",
        "fully_shard(model); rank 0 torch.load(f, mmap=True); set_model_state_dict(full_state_dict, "
        "broadcast_from_rank0)",
        fsdp2_model,
        torch_fsdp2_recipe,
        check_sharded,
        lambda file, model, world: model + file,  # the shards, and rank 0's mapping of the file
        reads_mapped=True,
    ),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}


def row_named(name: str) -> Row:
    """A row by its key (``pyckpt-group``) or its label (``"pyckpt group"``)."""
    for row in ROWS:
        if name in (row.key, row.label):
            return row
    raise argparse.ArgumentTypeError(f"no row {name!r}; rows: {', '.join(row.key for row in ROWS)}")


# --------------------------------------------------------------------------- one rank (spawned)


@dataclass
class RowRecord:
    """One rank's run of one row: what it wrote to its results file."""

    world: int
    round: int
    cache: str
    row: str
    rank: int
    seconds: float = math.nan
    rchar: int = 0  # bytes this rank's read calls returned during the timed call
    disk_read: int = 0  # bytes read from the disk for this rank during the timed call
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None


def join_group(rank_index: int, plan: SpawnPlan) -> torch.device:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(plan.port)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if plan.backend == "nccl":
        device = torch.device("cuda", rank_index)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank_index, world_size=plan.world, timeout=timeout, device_id=device)
        return device
    dist.init_process_group(plan.backend, rank=rank_index, world_size=plan.world, timeout=timeout)
    return torch.device("cpu")


def rank_main(rank_index: int, plan: SpawnPlan) -> None:
    """Entry point of each spawned rank."""
    # As torchrun does (OMP_NUM_THREADS=1 for several ranks): the ranks share the CPUs, so
    # torch's intra-op pools do not each claim all of them. pyckpt keeps its default threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.world))
    device = join_group(rank_index, plan)
    rank = Rank(rank_index, plan.world, device, Checkpoint.read(plan.checkpoint_dir))
    preload_imports()  # pyckpt's lazy imports are no part of a load; nor are torch's:
    for module in ("torch.distributed.checkpoint.state_dict", "torch.distributed.fsdp", "torch.distributed.tensor"):
        importlib.import_module(module)

    rows = [ROWS_BY_KEY[key] for key in plan.row_keys]
    warm_up(rank, rows, Checkpoint(plan.warm_up_dir, WARM_UP_CONFIG, {}))
    results = open(plan.results_dir / f"rank{rank_index}.jsonl", "a")
    try:
        for round_number in range(1, plan.repeat + 1):
            for cache in plan.cache_states:
                for row in rows:
                    record = run_row(rank, row, cache, round_number)
                    results.write(json.dumps(asdict(record)) + "\n")
                    results.flush()  # a later hang or crash keeps what was measured
                    report_progress(rank, row, record, plan)
    finally:
        results.close()
        dist.destroy_process_group()


def write_warm_up_checkpoint(directory: Path) -> None:
    """A tiny DataParallel checkpoint of the benchmark's layout (values do not matter)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(WARM_UP_CONFIG)
    torch.save(dp_state_dict(model), Checkpoint(directory, WARM_UP_CONFIG, {}).pt_path)


def warm_up(rank: Rank, rows: Sequence[Row], tiny_checkpoint: Checkpoint) -> None:
    """Every row once, untimed, on a tiny checkpoint: a first call pays for what a job pays
    once (lazy imports, gloo's first messages, torch's dispatch caches, FSDP2's first
    sharding); left in, the first cooperative load of a process took about twice as long as
    the next ones (0.05 against 0.025 s at 0.05 GiB, one rank)."""
    sharded = any(not row.replicated for row in rows)
    tiny = Rank(rank.index, rank.world, rank.device, tiny_checkpoint, _mesh=rank.mesh if sharded else None)
    for row in rows:
        ok = True
        try:
            row.load(tiny, row.prepare(tiny))
            synchronize(rank.device)
        except Exception as exc:  # noqa: BLE001 - the timed run of the row reports it
            ok = False
            print(f"rank {rank.index}: warm-up of {row.label} failed: {describe(exc)}", flush=True)
        all_ranks_ok(ok)  # a barrier, also after a failure
    del tiny
    free_memory(rank.device)


def all_ranks_ok(ok: bool) -> bool:
    """Whether every rank is ok; also a barrier. Keeps a rank that failed alone out of the
    timed call, where its peers would wait for it in a collective."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ok)
    return all(everyone)


def memory_verdict(rank: Rank, row: Row) -> str | None:
    """Rank 0's decision, shared with all: why the row would not fit in memory, or None.
    Host memory only: with NCCL the models live on the GPUs, whose memory is not checked."""
    decision: list[Any] = [None]
    if rank.index == 0 and rank.device.type == "cpu":
        file_bytes = rank.path.stat().st_size
        model_bytes = rank.checkpoint.config.nbytes()
        need = row.extra_memory(file_bytes, model_bytes, rank.world) + MEMORY_MARGIN
        if row.replicated and rank.replicated is None:
            need += rank.world * model_bytes  # every rank's whole model, built by this row
        available = meminfo("MemAvailable")
        if need > available:
            decision[0] = f"needs ~{need / GIB:.1f} GiB, MemAvailable {available / GIB:.1f} GiB"
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


def set_page_cache(rank: Rank, cache: str) -> str | None:
    """Rank 0 warms or drops the page cache while the others wait; its failure, on every rank
    (a rank that skipped the timed call alone would leave its peers in a collective)."""
    dist.barrier()
    failure: list[Any] = [None]
    if rank.index == 0:
        failure[0] = drop_page_cache() if cache == "cold" else warm(rank.path)
    dist.broadcast_object_list(failure, src=0)  # also the barrier after
    return failure[0]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(rank: Rank, row: Row, cache: str, round_number: int) -> RowRecord:
    record = RowRecord(rank.world, round_number, cache, row.key, rank.index)
    free_memory(rank.device)
    record.skipped = memory_verdict(rank, row)
    if record.skipped:
        return record
    model: nn.Module | None = None
    try:
        model = row.prepare(rank)
        synchronize(rank.device)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        record.error = describe(exc)
    if not all_ranks_ok(record.error is None):
        record.error = record.error or "another rank failed to prepare"
        return record
    record.error = set_page_cache(rank, cache)
    if record.error is None:
        assert model is not None
        try:
            before = io_counters()
            start = time.perf_counter()
            row.load(rank, model)
            synchronize(rank.device)  # copies may still be queued on the stream
            record.seconds = time.perf_counter() - start
            after = io_counters()
            record.rchar = after["rchar"] - before["rchar"]
            record.disk_read = after["read_bytes"] - before["read_bytes"]
            record.problems = row.check(rank, model)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            record.error = describe(exc)
    del model  # FSDP2 models die here; the replicated one lives on in ``rank``
    free_memory(rank.device)
    return record


def describe(exc: BaseException) -> str:
    traceback.print_exc()
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def report_progress(rank: Rank, row: Row, record: RowRecord, plan: SpawnPlan) -> None:
    """Rank 0 prints the row's slowest time and largest read; also the barrier between rows."""
    everyone: list[Any] = [None] * rank.world
    dist.all_gather_object(everyone, (record.seconds, record.rchar, bool(record.problems)))
    if rank.index != 0:
        return
    if record.skipped or record.error:
        status = f"skipped: {record.skipped}" if record.skipped else f"FAILED: {record.error}"
    else:
        slowest = max(seconds for seconds, _, _ in everyone)
        most_read = max(read for _, read, _ in everyone)
        wrong = " WRONG" if any(bad for _, _, bad in everyone) else ""
        status = f"slowest rank {slowest:.3f} s, read <= {most_read / MIB:.1f} MiB/rank{wrong}"
    print(f"  world {rank.world} [{record.round}/{plan.repeat}] {record.cache:4s} {row.label}: {status}", flush=True)


# --------------------------------------------------------------------------- the parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_world(plan: SpawnPlan) -> str | None:
    """Run one group to its end; why it did not end well, or None."""
    context = mp.start_processes(rank_main, args=(plan,), nprocs=plan.world, join=False, start_method="spawn")
    limit = SPAWN_TIMEOUT_S * plan.repeat
    deadline = time.monotonic() + limit
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                return f"the group of {plan.world} did not finish within {limit} s"
    except Exception as exc:  # noqa: BLE001 - a rank died: the rows it finished still count
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return None


def read_records(results_dir: Path) -> list[RowRecord]:
    records = []
    for path in sorted(results_dir.glob("rank*.jsonl")):
        records += [RowRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return records


@dataclass
class Cell:
    """One (cache state, world size, row): every rank's records of every round."""

    world: int
    row: Row
    records: list[RowRecord] = field(default_factory=list)

    def rounds(self) -> dict[int, list[RowRecord]]:
        by_round: dict[int, list[RowRecord]] = {}
        for record in self.records:
            by_round.setdefault(record.round, []).append(record)
        return by_round

    @property
    def skipped(self) -> str | None:
        return next((r.skipped for r in self.records if r.skipped), None)

    @property
    def failure(self) -> str | None:
        errors = sorted({f"rank {r.rank}: {r.error}" for r in self.records if r.error})
        if errors:
            return "FAILED: " + "; ".join(errors[:2]) + (f" (+{len(errors) - 2})" if len(errors) > 2 else "")
        if not self.records or any(len(ranks) != self.world for ranks in self.rounds().values()):
            return "FAILED: a rank left no result (see below the table)"
        return None

    @property
    def problems(self) -> list[str]:
        return sorted({f"rank {r.rank}: {p}" for r in self.records for p in r.problems})

    @property
    def seconds(self) -> float:
        """Median over rounds of the slowest rank's time."""
        slowest = [max(r.seconds for r in ranks) for ranks in self.rounds().values()]
        return statistics.median(slowest) if slowest else math.nan

    @property
    def most_read(self) -> int:
        return max((r.rchar for r in self.records), default=0)

    @property
    def most_from_disk(self) -> int:
        return max((r.disk_read for r in self.records), default=0)

    def check(self) -> str:
        if self.failure:
            return self.failure
        problems = self.problems
        if problems:
            return "WRONG: " + "; ".join(problems[:2]) + (f" (+{len(problems) - 2} more)" if len(problems) > 2 else "")
        return "ok"


def table_rows(cells: Sequence[Cell], file_bytes: int) -> list[tuple[str, ...]]:
    baselines = {cell.world: cell for cell in cells if cell.row.key == BASELINE_ROW}
    out = []
    for cell in cells:
        if cell.skipped:
            out.append((str(cell.world), cell.row.label, "", "", "", "", "", f"skipped: {cell.skipped}"))
            continue
        if cell.failure:
            out.append((str(cell.world), cell.row.label, "", "", "", "", "", cell.failure))
            continue
        baseline = baselines.get(cell.world)
        usable = baseline is not None and not baseline.failure and not baseline.skipped
        ratio = f"{baseline.seconds / cell.seconds:.2f}x" if usable else "n/a"
        read = f"{cell.most_read / MIB:.1f}" + (" *" if cell.row.reads_mapped else "")
        out.append(
            (
                str(cell.world),
                cell.row.label,
                f"{cell.seconds:.3f}",
                "baseline" if cell is baseline else ratio,
                read,
                f"{cell.most_read / file_bytes:.0%}",
                f"{cell.most_from_disk / MIB:.1f}",
                "ok" if cell.check() == "ok" else ("WRONG" if cell.check().startswith("WRONG") else cell.check()),
            )
        )
    return out


HEADER = (
    "world",
    "row",
    "slowest rank s",
    "vs torch each rank",
    "MiB read/rank (max)",
    "of file",
    "MiB from disk/rank",
    "check",
)


def print_report(
    cells_by_cache: dict[str, list[Cell]], spawn_failures: dict[int, str], checkpoint: Checkpoint,
    args: argparse.Namespace,
) -> int:
    """The tables, the problems in full, and the exit status (1: a row failed or was wrong)."""
    import pyckpt

    file_bytes = checkpoint.pt_path.stat().st_size
    cfg = checkpoint.config
    cpus = os.cpu_count() or 1
    print()
    print(
        f"machine     {cpus} CPUs, MemTotal {meminfo('MemTotal') / GIB:.1f} GiB, torch {torch.__version__}, "
        f"pyckpt backend {pyckpt.backend()}, python {platform.python_version()}, load average "
        f"{os.getloadavg()[0]:.1f} (above {cpus}: other work competed)"
    )
    print(
        f"checkpoint  {checkpoint.pt_path} ({file_bytes / GIB:.2f} GiB; DataParallel LM width {cfg.width}, "
        f"{cfg.depth} blocks, tied embedding)"
    )
    print(
        f"ranks       {args.backend}, spawned on this machine; torch threads per rank = CPUs // world; "
        f"slowest rank's wall time, median of {args.repeat}"
    )
    failed = False
    for cache, cells in cells_by_cache.items():
        print(f"\n### {cache} page cache\n")
        for line in markdown_table(HEADER, table_rows(cells, file_bytes)):
            print(line)
        print(
            "\nvs torch each rank: its time / this row's (above 1: faster). MiB read: rchar growth of the rank "
            "that read most (file reads; gloo's sockets are not counted)."
        )
        if any(cell.row.reads_mapped for cell in cells):
            print("* reads through a mapping (torch.load(mmap=True)): page faults are not in rchar; see MiB from disk.")
        if cache == "warm":
            evicted = [f"world {c.world} {c.row.label}" for c in cells if c.most_from_disk > 0.05 * file_bytes]
            if evicted:
                print(f"! warm rows that read > 5% of the file from disk (memory pressure): {', '.join(evicted)}")
        for cell in cells:
            detail = cell.failure or ("; ".join(cell.problems) if cell.problems else None)
            if detail:
                failed = True
                print(f"! world {cell.world} {cell.row.label}: {detail}")
    for world, failure in spawn_failures.items():
        failed = True
        print(f"! the group of {world} rank(s) ended badly: {failure}")
    if failed:
        print("\n!!! WRONG OR FAILED rows: their times mean nothing.")
    return 1 if failed else 0


def cold_is_possible(cache_states: list[str]) -> list[str]:
    """The cache states that can run: cold needs a writable drop_caches (tried once here)."""
    if "cold" not in cache_states:
        return cache_states
    failure = drop_page_cache()
    if failure is None:
        return cache_states
    print(f"cold page cache skipped: {failure}")
    return [state for state in cache_states if state != "cold"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    rows_help = "\n".join(f"  {row.key:14s} {row.label!r}: {row.explanation}" for row in ROWS)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"rows (--rows takes the key or the quoted label):\n{rows_help}\n\n"
        "A row is skipped, with its reason, when rank 0 finds its memory estimate above MemAvailable.",
    )
    parser.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size (default 2)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(DEFAULT_WORLD_SIZES), help="default 1 2 4")
    parser.add_argument("--rows", type=row_named, nargs="+", default=list(ROWS), help="rows to run (default all)")
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default="both", help="page cache (default both)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each row; the median is shown (default 1)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"cache (default {DEFAULT_DATA_DIR})")
    parser.add_argument(
        "--backend",
        choices=("gloo", "nccl"),
        default="gloo",
        help="gloo: ranks on the CPU (default); nccl: rank r on cuda:r, broadcasts over NCCL",
    )
    args = parser.parse_args(argv)
    if args.backend == "nccl" and max(args.world_sizes) > torch.cuda.device_count():
        parser.error(f"--backend nccl needs a GPU per rank: {torch.cuda.device_count()} visible")
    if min(args.world_sizes) < 1 or args.repeat < 1:
        parser.error("world sizes and --repeat must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    cache_states = cold_is_possible(list(CACHE_STATES) if args.cache == "both" else [args.cache])
    checkpoint = prepare_checkpoint(args.data_dir, args.size_gib, with_safetensors=False)
    rows: list[Row] = list(dict.fromkeys(args.rows))  # in the order given, once each
    print(
        f"{checkpoint.pt_path}: {checkpoint.pt_path.stat().st_size / GIB:.2f} GiB; world sizes "
        f"{' '.join(map(str, args.world_sizes))}; rows: {', '.join(row.label for row in rows)}; "
        f"cache: {', '.join(cache_states)}; backend {args.backend}",
        flush=True,
    )
    cells_by_cache: dict[str, list[Cell]] = {cache: [] for cache in cache_states}
    spawn_failures: dict[int, str] = {}
    for world in args.world_sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-distributed-{world}-") as results_dir:
            write_warm_up_checkpoint(Path(results_dir) / "warm-up")
            plan = SpawnPlan(
                world, free_port(), args.backend, checkpoint.directory, Path(results_dir) / "warm-up",
                Path(results_dir), tuple(row.key for row in rows), tuple(cache_states), args.repeat,
            )
            failure = spawn_world(plan)
            if failure:
                spawn_failures[world] = failure
                print(f"  world {world}: {failure}", flush=True)
            records = read_records(Path(results_dir))
        for cache in cache_states:
            for row in rows:
                mine = [r for r in records if r.cache == cache and r.row == row.key]
                cells_by_cache[cache].append(Cell(world, row, mine))
    return print_report(cells_by_cache, spawn_failures, checkpoint, args)


if __name__ == "__main__":
    sys.exit(main())
