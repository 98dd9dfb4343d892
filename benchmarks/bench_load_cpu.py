"""CPU load benchmark: a DataParallel checkpoint (>= 2 GiB, warm page cache) into host memory.

    python benchmarks/bench_load_cpu.py [--size-gib 2] [--repeat 3] [--threads N]

Three groups of rows, each with its own baseline:
- into an already-built model: pyckpt.load_state_dict against torch.load(mmap=True) +
  consume_prefix + load_state_dict, eager torch.load, safetensors, and a plain parallel pread
  of the same bytes into the same parameter memory (the ceiling);
- to a dict in its own memory: pyckpt.load(mmap=False) against torch.load;
- to a dict mapped from the file: pyckpt.load() against torch.load(mmap=True).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from common import (
    DP_PREFIX,
    READ_BLOCK,
    TIED_NAMES,
    Checkpoint,
    Contender,
    Measurement,
    build_model,
    benchmark_main,
    check_model,
    check_state_dict,
)

INTO_MODEL = "into a built model"
FRESH_DICT = "to a dict, own memory"
MAPPED_DICT = "to a dict, mapped"

PYCKPT_ROW = "pyckpt.load_state_dict"
TORCH_MMAP_ROW = "torch.load(mmap) + load_state_dict"
CEILING_ROW = "parallel pread (ceiling)"
TARGET_SPEEDUP = 2.0
TARGET_CEILING_SHARE = 0.80


def pyckpt_into_model(checkpoint: Checkpoint, model: nn.Module) -> Any:
    import pyckpt

    return pyckpt.load_state_dict(model, checkpoint.pt_path)


def torch_into_model(mmap: bool) -> Callable[[Checkpoint, nn.Module], Any]:
    def run(checkpoint: Checkpoint, model: nn.Module) -> Any:
        state_dict = torch.load(checkpoint.pt_path, mmap=mmap, weights_only=True)
        consume_prefix_in_state_dict_if_present(state_dict, DP_PREFIX)
        return model.load_state_dict(state_dict)

    return run


def safetensors_into_model(checkpoint: Checkpoint, model: nn.Module) -> Any:
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(checkpoint.safetensors_path), strict=False)
    # The file stores the tied weight once (safetensors refuses shared tensors).
    if set(result.missing_keys) - set(TIED_NAMES) or result.unexpected_keys:
        raise RuntimeError(f"safetensors load_state_dict: {result}")
    return result


# ---------------------------------------------------------------- the parallel-pread ceiling

ReadJob = tuple[int, int, memoryview]  # which file, file offset, destination bytes


def plan_file_preads(model: nn.Module, paths: Sequence[str | os.PathLike[str]]) -> list[ReadJob]:
    """Each storage's bytes in ``paths`` (a pt file, safetensors files or shards) cut in
    READ_BLOCK pieces (as pyckpt's reader does) aimed at the parameter of ``model`` that owns
    them, a storage read once per file. Untimed: a ceiling for moving the bytes only."""
    from pyckpt.index import index_checkpoint

    params = model.state_dict(keep_vars=True)
    jobs: list[ReadJob] = []
    for file, path in enumerate(paths):
        seen: set[str] = set()
        with index_checkpoint(os.fspath(path)) as index:
            for name, record in index.root.items():
                storage = record.storage
                if storage.key in seen:  # the tied weight: one storage, read once
                    continue
                seen.add(storage.key)
                dest = params[name.removeprefix(DP_PREFIX)].detach().reshape(-1).view(torch.uint8)
                if record.storage_offset != 0 or dest.numel() != storage.nbytes:
                    raise RuntimeError(f"{name} does not fill its storage; the ceiling assumes it does")
                view = memoryview(dest.numpy())
                for start in range(0, storage.nbytes, READ_BLOCK):
                    jobs.append((file, storage.data_offset + start, view[start : start + READ_BLOCK]))
    return jobs


def read_file_preads(paths: Sequence[str | os.PathLike[str]], jobs: list[ReadJob]) -> None:
    """Run ``plan_file_preads``'s jobs on pyckpt's number of I/O threads."""
    from pyckpt._env import io_threads

    fds = [os.open(path, os.O_RDONLY) for path in paths]
    try:

        def read(job: ReadJob) -> None:
            file, offset, dest = job
            while dest:  # preadv may return short
                count = os.preadv(fds[file], [dest], offset)
                if count == 0:
                    raise EOFError(f"{paths[file]} ends before offset {offset}")
                offset, dest = offset + count, dest[count:]

        with ThreadPoolExecutor(max_workers=io_threads()) as pool:
            list(pool.map(read, jobs))
    finally:
        for fd in fds:
            os.close(fd)


def plan_pread(checkpoint: Checkpoint) -> tuple[nn.Module, list[ReadJob]]:
    """The model, and the pt file's preads into it."""
    model = build_model(checkpoint.config)
    return model, plan_file_preads(model, [checkpoint.pt_path])


def pread_into_model(checkpoint: Checkpoint, state: tuple[nn.Module, list[ReadJob]]) -> None:
    read_file_preads([checkpoint.pt_path], state[1])


# ---------------------------------------------------------------- the rows


def check_into_model(checkpoint: Checkpoint, model: nn.Module, _: Any) -> list[str]:
    return check_model(model, checkpoint)


def check_pread(checkpoint: Checkpoint, state: tuple[nn.Module, list[ReadJob]], _: None) -> list[str]:
    return check_model(state[0], checkpoint)


def check_loaded_dict(checkpoint: Checkpoint, _: Any, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    return check_state_dict(state_dict, checkpoint)


def model_for(checkpoint: Checkpoint) -> nn.Module:
    return build_model(checkpoint.config)


def pyckpt_load(mmap: bool | None) -> Callable[[Checkpoint, None], Any]:
    def run(checkpoint: Checkpoint, _: None) -> Any:
        import pyckpt

        return pyckpt.load(checkpoint.pt_path, mmap=mmap)

    return run


def torch_load(mmap: bool) -> Callable[[Checkpoint, None], Any]:
    def run(checkpoint: Checkpoint, _: None) -> Any:
        return torch.load(checkpoint.pt_path, mmap=mmap, weights_only=True)

    return run


CONTENDERS = [
    Contender(TORCH_MMAP_ROW, INTO_MODEL, torch_into_model(mmap=True), check_into_model, model_for, baseline=True),
    Contender(PYCKPT_ROW, INTO_MODEL, pyckpt_into_model, check_into_model, model_for),
    Contender("torch.load + load_state_dict", INTO_MODEL, torch_into_model(mmap=False), check_into_model, model_for),
    Contender(
        "safetensors load_file + load_state_dict",
        INTO_MODEL,
        safetensors_into_model,
        check_into_model,
        model_for,
        reads_safetensors=True,
    ),
    Contender(CEILING_ROW, INTO_MODEL, pread_into_model, check_pread, plan_pread),
    Contender("torch.load", FRESH_DICT, torch_load(mmap=False), check_loaded_dict, baseline=True),
    Contender("pyckpt.load(mmap=False)", FRESH_DICT, pyckpt_load(mmap=False), check_loaded_dict),
    Contender("torch.load(mmap=True)", MAPPED_DICT, torch_load(mmap=True), check_loaded_dict, baseline=True),
    Contender("pyckpt.load (mapped)", MAPPED_DICT, pyckpt_load(mmap=None), check_loaded_dict),
]


def verdict(measurements: Mapping[str, Measurement]) -> str:
    rows = [measurements.get(name) for name in (PYCKPT_ROW, TORCH_MMAP_ROW, CEILING_ROW)]
    if any(m is None or m.failure for m in rows):
        return "verdict: none (a row it needs was not run, failed or was wrong)"
    pyckpt_row, torch_row, ceiling_row = rows
    speedup = torch_row.seconds / pyckpt_row.seconds  # type: ignore[union-attr]
    share = ceiling_row.seconds / pyckpt_row.seconds  # type: ignore[union-attr]

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return (
        f"verdict: {PYCKPT_ROW} is {speedup:.2f}x {TORCH_MMAP_ROW} (target >= {TARGET_SPEEDUP:g}x: "
        f"{met(speedup >= TARGET_SPEEDUP)}) and {share:.0%} of the {CEILING_ROW} "
        f"(target >= {TARGET_CEILING_SHARE:.0%}: {met(share >= TARGET_CEILING_SHARE)})"
    )


if __name__ == "__main__":
    sys.exit(benchmark_main(Path(__file__).resolve(), __doc__.splitlines()[0], CONTENDERS, verdict))
