"""Index the torch zip format (``torch.save`` since 1.6) and TorchScript archives."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .checkpoint import FORMAT_TORCHSCRIPT, FORMAT_ZIP, CheckpointIndex, read_small_record
from .interpret import Interpreter
from .policy import GlobalsPolicy, for_compressed_pickle
from .records import METHOD_STORED, StorageRecord
from .source import Source
from .symbols import DType

if TYPE_CHECKING:
    from .._backend import Backend

PICKLE_LIMIT = 1 << 31


def zip_entries_of(source: Source, backend: Backend) -> Any:
    """The source's central directory by record name, read once per open source."""
    if source.zip_directory is None:
        source.zip_directory = backend.zip_entries(source)
    return source.zip_directory


def index_zip(source: Source, backend: Backend, policy: GlobalsPolicy | None = None) -> CheckpointIndex:
    entries = zip_entries_of(source, backend)
    if not entries:
        raise CheckpointError("zip archive has no records, so it is not a torch checkpoint")
    first = next(iter(entries))
    if "/" not in first:
        raise CheckpointError(f"zip records are not under a top folder (first record '{first}')")
    top = first.split("/", 1)[0]
    data_name = f"{top}/data.pkl"
    if data_name not in entries:
        raise CheckpointError(f"no '{data_name}' record: this zip is not a torch checkpoint")
    torchscript = f"{top}/constants.pkl" in entries

    byteorder = default_load_byteorder()
    byteorder_entry = entries.get(f"{top}/byteorder")
    if byteorder_entry is not None:
        value = read_small_record(source, byteorder_entry, limit=16)
        if value not in (b"little", b"big"):
            raise CheckpointError(f"unknown byte order {value[:16]!r}", record=byteorder_entry.name)
        byteorder = value.decode()

    storages: dict[str, StorageRecord] = {}

    def persistent_load(key: str, dtype: DType, location: str, numel: int, view: Any) -> StorageRecord:
        if view is not None:
            raise CheckpointError(f"storage '{key}' is a legacy storage view, which the zip format never writes")
        known = storages.get(key)
        if known is not None:
            return known
        name = f"{top}/data/{key}"
        entry = entries.get(name)
        if entry is None:
            raise CheckpointError(f"storage '{key}' has no record", record=name)
        nbytes = numel * dtype.itemsize
        if nbytes > entry.size:
            raise CheckpointError(
                f"storage declares {numel} x {dtype.itemsize}-byte elements ({nbytes} bytes) "
                f"but the record holds {entry.size}",
                record=name,
            )
        record = StorageRecord(
            key=key,
            dtype=dtype,
            nbytes=nbytes,
            location=location,
            record=name,
            data_offset=entry.data_offset,
            stored_size=entry.compressed_size,
            method=entry.method,
            crc32=entry.crc32,
            byteswap=byteorder == "big" and _swap_width(dtype) > 1,
            record_size=entry.size,
        )
        storages[key] = record
        return record

    pickle_bytes = read_small_record(source, entries[data_name], limit=PICKLE_LIMIT)
    policy = policy if policy is not None else GlobalsPolicy()
    if entries[data_name].method != METHOD_STORED:
        policy = for_compressed_pickle(policy, entries[data_name].compressed_size)
    interpreter = Interpreter(persistent_load, torchscript=torchscript, policy=policy)
    directory = getattr(entries, "directory", None)
    if directory is not None:
        # The native converter makes the records persistent_load would make, for well-formed
        # ids, straight from the native directory (it falls back to persistent_load otherwise).
        interpreter.zip_storages = ZipStorages(directory, top, byteorder == "big", storages)
    try:
        root, _ = backend.unpickle(pickle_bytes, interpreter)
    except CheckpointError as exc:
        raise exc.located(record=exc.record or data_name)
    index = CheckpointIndex(
        source=source,
        format=FORMAT_TORCHSCRIPT if torchscript else FORMAT_ZIP,
        root=root,
        storages=storages,
        byteorder=byteorder,
        top_folder=top,
        entries=entries,
        unknown_globals=interpreter.unknown_names,
        tensor_records=interpreter.tensor_records,
        unchecked_views=interpreter.unchecked_views,
        end=source.size,
    )
    if torchscript:
        from .torchscript import script_state_dict

        index.root = script_state_dict(index)
    return index


@dataclass(frozen=True)
class ZipStorages:
    """What the native tree converter needs to make zip storage records as persistent_load does."""

    directory: Any  # pyckpt._core.ZipDirectory
    top: str
    big_endian: bool
    storages: dict[str, StorageRecord]  # shared with persistent_load: one table
    record_type: type = StorageRecord


def default_load_byteorder() -> str:
    """The byte order of a file without a ``byteorder`` record: little, unless the user set
    ``torch.serialization.set_default_load_endianness`` (read only if torch is imported)."""
    serialization = sys.modules.get("torch.serialization")
    get = getattr(serialization, "get_default_load_endianness", None)
    setting = get() if get is not None else None
    name = getattr(setting, "name", None)
    if name == "BIG":
        return "big"
    if name == "NATIVE":
        return sys.byteorder
    return "little"


def _swap_width(dtype: DType) -> int:
    return dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize


def swap_width(record: StorageRecord) -> int:
    """Bytes per swapped unit when a big-endian storage is brought to native order."""
    return _swap_width(record.dtype)
