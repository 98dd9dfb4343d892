"""``pyckpt verify``: parse everything, check every view and every record's CRC-32.

torch never checks CRCs. Here each record's data is read with pread (never mapped, so a
file truncated meanwhile cannot SIGBUS us) and checked on several threads, natively.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from ._collector import without_collector
from ._backend import current_backend
from .errors import CheckpointError
from .index import FORMAT_LEGACY, FORMAT_SAFETENSORS, index_checkpoint
from .index.checkpoint import CheckpointIndex, iter_inflated
from .index.policy import UNKNOWN_OPAQUE, policy_for
from .index.records import METHOD_DEFLATE, TensorRecord, ZipEntry
from .index.dcp_format import is_dcp_directory
from .index.sharded import ShardedCheckpoint, checkpoint_files, open_sharded
from .plan import check_view, iter_records


@dataclass
class VerifyReport:
    path: str
    format: str = "?"
    records: int = 0
    bytes_checked: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@without_collector
def verify_checkpoint(path: str | os.PathLike[str]) -> VerifyReport:
    """Every check on one file; for a sharded directory, on every shard and on the index;
    for a DCP directory, its metadata and every chunk, read and assembled."""
    if is_dcp_directory(path):
        return _verify_dcp(os.fspath(path))
    try:
        files = checkpoint_files(path)
    except CheckpointError as exc:
        report = VerifyReport(os.fspath(path))
        report.problems.append(str(exc))
        return report
    if isinstance(files, ShardedCheckpoint):
        return _verify_shards(os.fspath(path), files)
    return _verify_file(files if isinstance(files, str) else path)


def _verify_shards(path: str, sharded: ShardedCheckpoint) -> VerifyReport:
    report = VerifyReport(path, format="sharded")
    for shard in sharded.shards:
        part = _verify_file(shard)
        report.records += part.records
        report.bytes_checked += part.bytes_checked
        report.tensors += part.tensors
        report.problems += part.problems
        report.notes += [f"{os.path.basename(shard)}: {note}" for note in part.notes]
    if not report.problems:  # every shard reads: now the index against what they hold
        try:
            open_sharded(sharded, current_backend(), policy_for(UNKNOWN_OPAQUE)).close()
        except CheckpointError as exc:
            report.problems.append(str(exc))
    return report


def _verify_dcp(path: str) -> VerifyReport:
    """A DCP directory loaded whole (which imports torch): every chunk read with the restricted
    loader and fitted into its tensor. DCP records no checksums of its own."""
    from .dcp_loading import load_dcp

    report = VerifyReport(path, format="dcp")
    try:
        loaded = load_dcp(path, "cpu", UNKNOWN_OPAQUE)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    report.tensors = _count_tensors(loaded)
    report.notes.append("dcp format: every chunk was read and assembled; DCP records no checksums to compare")
    return report


def _count_tensors(tree: Any) -> int:
    import torch

    count = 0
    stack = [tree]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            count += 1
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return count


def _verify_file(path: str | os.PathLike[str]) -> VerifyReport:
    report = VerifyReport(os.fspath(path))
    backend = current_backend()
    try:
        index = index_checkpoint(path, backend)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    with index:
        report.format = index.format
        keys_by_record: dict[str, list[str]] = {}
        for key, record in iter_records(index.root):
            if isinstance(record, TensorRecord):
                report.tensors += 1
                keys_by_record.setdefault(record.storage.record or record.storage.key, []).append(key)
                try:
                    check_view(record, key)
                except CheckpointError as exc:
                    report.problems.append(str(exc.located(path=index.display)))
        if index.format in (FORMAT_LEGACY, FORMAT_SAFETENSORS):
            report.notes.append(f"{index.format} format: it records no CRCs, so only structure and sizes were checked")
            return report
        try:
            _check_crcs(index, backend, keys_by_record, report)
        except CheckpointError as exc:
            report.problems.append(str(exc.located(path=index.display)))
    return report


def _check_crcs(
    index: CheckpointIndex, backend: Any, keys_by_record: dict[str, list[str]], report: VerifyReport
) -> None:
    """Compare each record's CRC-32 with the central directory's, naming the keys it holds."""
    entries = list(index.entries.values())
    unchecked = [e.name for e in entries if e.crc32 == 0 and e.size > 0]
    if unchecked:
        report.notes.append(f"{len(unchecked)} records carry no CRC (written with CRCs off), e.g. '{unchecked[0]}'")
    checked = [e for e in entries if not (e.crc32 == 0 and e.size > 0)]
    stored = [e for e in checked if e.method != METHOD_DEFLATE]
    crcs = backend.crc32_ranges(index.source, [(e.data_offset, e.size) for e in stored])
    actual: dict[str, int | None] = dict(zip((e.name for e in stored), crcs))
    for entry in checked:
        if entry.method == METHOD_DEFLATE:
            actual[entry.name] = _inflated_crc(index, entry)
    for entry in checked:
        report.records += 1
        report.bytes_checked += entry.size
        if actual[entry.name] is None:
            report.problems.append(f"{index.display}: record '{entry.name}': deflate data is corrupt")
        elif actual[entry.name] != entry.crc32:
            keys = keys_by_record.get(entry.name, [])
            used_by = f"; holds {', '.join(repr(k) for k in keys[:3])}{' ...' if len(keys) > 3 else ''}" if keys else ""
            report.problems.append(
                f"{index.display}: record '{entry.name}': CRC32 mismatch (central directory says "
                f"{entry.crc32:08x}, data is {actual[entry.name] or 0:08x}){used_by}"
            )


def _inflated_crc(index: CheckpointIndex, entry: ZipEntry) -> int | None:
    """CRC of a deflate record's inflated bytes, or None when it does not inflate cleanly."""
    crc = 0
    try:
        chunks = iter_inflated(
            index.source, entry.data_offset, entry.compressed_size, 0, entry.size, entry.name, declared=entry.size
        )
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
    except CheckpointError:
        return None
    return crc
