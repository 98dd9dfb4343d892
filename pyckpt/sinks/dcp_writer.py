"""Write a checkpoint as a ``torch.distributed.checkpoint`` (DCP) directory, as one rank's
``dcp.save`` would: ``__0_0.distcp`` holding one small torch file per entry, and ``.metadata``.

Nothing here imports torch (importing ``torch.distributed.checkpoint`` alone costs about 250 MiB
of resident memory and a second of start-up). The tree is flattened by the rules of torch's
``flatten_state_dict`` (``dcp_flatten``), giving the same flat keys and ``planner_data`` paths
as ``dcp.save``. Each tensor is written with the storage copier straight from the source, so
memory stays flat; every other value is pickled with pyckpt's own writer. ``.metadata`` is
written by name with that writer too: the same classes, fields and states that ``pickle.dump``
writes for torch's metadata dataclasses (a test compares the two, field by field). Tied
weights are written under each key, as ``dcp.save`` writes them.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

from ..index.checkpoint import CheckpointIndex
from ..index.opaque import Opaque
from ..index.records import ParameterRecord, TensorRecord, without_parameter
from .atomic import AtomicDirectory
from .pickle_writer import PairDict, PickleWriter
from .pt_writer import WrittenFile, write_pt
from .range_copy import Progress

if TYPE_CHECKING:
    from .._backend import Backend

DATA_FILE = "__0_0.distcp"
METADATA_FILE = ".metadata"


METADATA_MODULE = "torch.distributed.checkpoint.metadata"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION
ObjectPath = tuple[str | int, ...]


def dcp_flatten(root: dict[Any, Any]) -> tuple[dict[str, Any], dict[str, ObjectPath]]:
    """The leaves of ``root`` under their dotted keys, and each key's path: torch's
    ``flatten_state_dict`` (its traversal since 2.4), with tensor records as the tensors.

    Mappings are walked; a list is walked only if a tensor or a mapping lies somewhere
    inside it, else it is one leaf; tuples and everything else are leaves."""
    flat: dict[str, Any] = {}
    paths: dict[str, ObjectPath] = {}

    def is_tensor(value: Any) -> bool:
        return isinstance(value, (TensorRecord, ParameterRecord))

    def is_leaf(value: Any) -> bool:
        if isinstance(value, dict):
            return False
        if not isinstance(value, list):
            return True
        return not any(
            (isinstance(item, (dict, list)) and not is_leaf(item)) or is_tensor(item) for item in value
        )

    def walk(path: ObjectPath, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(path + (str(key),), item)
        elif is_leaf(value):
            key = ".".join(map(str, path))
            if key in flat:
                raise ValueError(f"duplicated flatten key {key}")
            flat[key], paths[key] = value, path
        else:
            for position, item in enumerate(value):
                walk(path + (position,), item)

    for key, value in root.items():
        walk((str(key),), value)
    return flat, paths


def _instance(name: str, state: Any, module: str = METADATA_MODULE) -> Opaque:
    """A dataclass instance as protocol 2 pickles it: ``cls.__new__(cls)``, then BUILD."""
    return Opaque(module, name, (), new_object=True, state=state)


def _size(values: tuple[int, ...]) -> Opaque:
    return Opaque("torch", "Size", (tuple(values),))


# Written once and then fetched from the pickle's memo (the writer memoises by identity).
_STRIDED = Opaque("torch.serialization", "_get_layout", ("torch.strided",))  # as torch.layout pickles
_CONTIGUOUS = Opaque(METADATA_MODULE, "_MEM_FORMAT_ENCODING", (0,))  # TORCH_CONTIGUOUS_FORMAT
_DTYPES: dict[str, Opaque] = {}


def _tensor_entry(record: TensorRecord, requires_grad: bool) -> Opaque:
    dtype = _DTYPES.setdefault(record.dtype.name, Opaque("torch", record.dtype.name))
    # TensorProperties.__getstate__: dtype, layout, requires_grad, memory format, pinned
    properties = (dtype, _STRIDED, requires_grad, _CONTIGUOUS, False)
    zeros = _size((0,) * len(record.size))
    chunk = _instance("ChunkStorageMetadata", {"offsets": zeros, "sizes": _size(record.size)})
    return _instance(
        "TensorStorageMetadata",
        {"properties": _instance("TensorProperties", properties), "size": _size(record.size), "chunks": [chunk]},
    )


def write_dcp(
    index: CheckpointIndex,
    root: Any,
    destination: str,
    *,
    overwrite: bool,
    backend: Backend,
    progress: Progress | None = None,
) -> WrittenFile:
    if not isinstance(root, dict):
        raise TypeError(f"DCP output needs a dict at the root, not a {type(root).__name__}")
    flat, paths = dcp_flatten(root)
    state_dict_metadata: dict[str, Opaque] = {}
    storage_data: list[tuple[Opaque, Opaque]] = []
    written = WrittenFile(tensors_bytes=0, storages=0, file_bytes=0)
    with AtomicDirectory(destination, overwrite=overwrite) as directory:
        fd = directory.create(DATA_FILE)
        try:
            offset = 0
            for key, value in flat.items():
                record = without_parameter(value)
                item = write_pt(index, record, fd, "archive", backend, progress, base=offset)
                if isinstance(record, TensorRecord):
                    requires_grad = value.requires_grad if isinstance(value, ParameterRecord) else record.requires_grad
                    state_dict_metadata[key] = _tensor_entry(record, requires_grad)
                    where = {"fqn": key, "offset": _size((0,) * len(record.size)), "index": 0}
                    written.tensors_bytes += item.tensors_bytes
                    written.storages += item.storages
                else:
                    state_dict_metadata[key] = _instance("BytesStorageMetadata", {})
                    where = {"fqn": key, "offset": None, "index": None}
                info = {"relative_path": DATA_FILE, "offset": offset, "length": item.file_bytes}
                storage_data.append(
                    (_instance("MetadataIndex", where), _instance("_StorageInfo", info, "torch.distributed.checkpoint.filesystem"))
                )
                offset += item.file_bytes
            os.fsync(fd)
        finally:
            os.close(fd)
        storage_meta = {"checkpoint_id": destination, "save_id": str(uuid.uuid4()), "load_id": None, "modules": []}
        metadata = _instance(
            "Metadata",
            {
                "state_dict_metadata": state_dict_metadata,
                "planner_data": paths,
                "storage_data": PairDict(storage_data),
                "storage_meta": _instance("StorageMeta", storage_meta),
                "version": DCP_VERSION,
            },
        )
        writer = PickleWriter()
        writer.save(metadata)
        writer.out += b"."
        encoded = bytes(writer.out)
        directory.write_small(METADATA_FILE, encoded)
    written.file_bytes = offset + len(encoded)
    return written
