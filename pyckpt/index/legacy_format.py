"""Index the legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``).

The file is a run of pickles (magic number, protocol, system info, the object, the
storage keys) followed by each storage as an int64 element count and its raw bytes.
Storage offsets are found by walking those headers; no tensor byte is read.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, TruncatedCheckpointError, UnsafeCheckpointError
from .checkpoint import FORMAT_LEGACY, CheckpointIndex
from .interpret import Interpreter
from .policy import GlobalsPolicy
from .records import StorageRecord
from .source import Source
from .symbols import DType

if TYPE_CHECKING:
    from .._backend import Backend

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
FIRST_READ = 1 << 20


def looks_legacy(head: bytes) -> bool:
    """Protocol-2 pickle of a LONG1: how the legacy format's magic number starts."""
    return head[:3] == b"\x80\x02\x8a"


def index_legacy(source: Source, backend: Backend, policy: GlobalsPolicy | None = None) -> CheckpointIndex:
    window = min(source.size, FIRST_READ)
    while True:
        head = source.read(0, window)
        try:
            return _index(source, backend, head, policy)
        except TruncatedCheckpointError:
            if window == source.size:
                raise
            window = min(source.size, window * 4)


def _index(source: Source, backend: Backend, head: bytes, policy: GlobalsPolicy | None) -> CheckpointIndex:
    def no_storages(*_: Any) -> StorageRecord:
        raise UnsafeCheckpointError("persistent id in a legacy header pickle")

    plain = Interpreter(no_storages)
    magic, pos = backend.unpickle(head, plain)
    if magic != MAGIC_NUMBER:
        raise CheckpointError("not a legacy torch file: wrong magic number")
    protocol, pos = backend.unpickle(head, plain, start=pos)
    if protocol != PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy protocol version {protocol!r}")
    _sys_info, pos = backend.unpickle(head, plain, start=pos)

    storages: dict[str, StorageRecord] = {}
    views: dict[str, StorageRecord] = {}

    def persistent_load(key: str, dtype: DType, location: str, numel: int, view: Any) -> StorageRecord:
        if key in views:
            raise CheckpointError(f"storage '{key}' is named both as a storage and as a view")
        known = storages.get(key)
        if known is None:
            known = storages[key] = StorageRecord(
                key=key,
                dtype=dtype,
                nbytes=numel * dtype.itemsize,
                location=location,
                record=None,
                data_offset=-1,
                stored_size=numel * dtype.itemsize,
            )
        if view is None:
            return known
        return _view(known, view, dtype, location)

    def _view(base: StorageRecord, view: tuple[str, int, int], dtype: DType, location: str) -> StorageRecord:
        """A PyTorch 0.3-era view: elements [offset, offset + size) of ``base``, shared."""
        view_key, offset, size = view
        found = views.get(view_key)
        if found is not None:  # torch keeps the first view made under a key
            return found
        if view_key in storages:
            raise CheckpointError(f"storage view '{view_key}' reuses the key of a storage")
        if (offset + size) * dtype.itemsize > base.nbytes:
            raise CheckpointError(
                f"storage view '{view_key}' (elements {offset} to {offset + size}) passes the end of "
                f"storage '{base.key}' ({base.nbytes} bytes)"
            )
        found = views[view_key] = StorageRecord(
            key=view_key,
            dtype=dtype,
            nbytes=size * dtype.itemsize,
            location=location,
            record=None,
            data_offset=-1,
            stored_size=size * dtype.itemsize,
            view_of=base,
            view_start=offset * dtype.itemsize,
        )
        return found

    interpreter = Interpreter(persistent_load, policy=policy)
    root, pos = backend.unpickle(head, interpreter, start=pos)
    keys, pos = backend.unpickle(head, plain, start=pos)
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise CheckpointError("legacy storage key list is not a list of strings")

    for key in keys:
        record = storages.get(key)
        if record is None:
            raise CheckpointError(f"legacy file stores data for storage '{key}' that nothing uses")
        (numel,) = struct.unpack("<q", source.read(pos, 8))
        if numel < 0 or numel * record.element_size != record.nbytes:
            raise CheckpointError(
                f"storage '{key}' has {numel} elements in the file but the pickle declares "
                f"{record.nbytes // record.element_size}"
            )
        source.check_range(pos + 8, record.nbytes, f"storage '{key}'")
        record.data_offset = pos + 8
        pos += 8 + record.nbytes
    missing = [key for key, record in storages.items() if record.data_offset < 0]
    if missing:
        raise CheckpointError(f"legacy file has no data for storage '{missing[0]}'")
    for view in views.values():
        view.data_offset = view.view_of.data_offset + view.view_start  # type: ignore[union-attr]
    return CheckpointIndex(
        source=source,
        format=FORMAT_LEGACY,
        root=root,
        storages={**storages, **views},
        unknown_globals=interpreter.unknown_names,
        tensor_records=interpreter.tensor_records,
        unchecked_views=interpreter.unchecked_views,
        end=pos,
    )
