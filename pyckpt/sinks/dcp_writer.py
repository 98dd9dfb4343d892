"""Write a checkpoint as a ``torch.distributed.checkpoint`` (DCP) directory, as one rank's
``dcp.save`` would: ``__0_0.distcp`` holding one small torch file per entry, and ``.metadata``.

The tree is flattened with torch's own ``flatten_state_dict`` (run on meta-tensor stand-ins,
so no tensor byte is read for it), which gives exactly the flat keys and ``planner_data``
paths ``dcp.save`` gives. Each tensor is written with the storage copier straight from the
source, so memory stays flat; every other value is pickled with pyckpt's own writer. The
metadata is built from torch's own dataclasses and pickled as ``dcp.save`` pickles it (this
sink imports torch, as ``torch.distributed.checkpoint.load`` will need it anyway). Tied
weights are written under each key, as ``dcp.save`` writes them.
"""

from __future__ import annotations

import os
import pickle
import uuid
from typing import TYPE_CHECKING, Any

from ..index.checkpoint import CheckpointIndex
from ..index.records import ParameterRecord, TensorRecord
from .atomic import AtomicDirectory
from .pt_writer import WrittenFile, write_pt
from .range_copy import Progress

if TYPE_CHECKING:
    from .._backend import Backend

DATA_FILE = "__0_0.distcp"
METADATA_FILE = ".metadata"


def write_dcp(
    index: CheckpointIndex,
    root: Any,
    destination: str,
    *,
    overwrite: bool,
    backend: Backend,
    progress: Progress | None = None,
) -> WrittenFile:
    import torch
    from torch.distributed.checkpoint import metadata as dcp_metadata
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo

    from .torch_values import torch_dtype

    records: dict[int, TensorRecord] = {}

    def stand_in(value: Any) -> Any:
        """The tree with each tensor record as a meta tensor of its dtype and size."""
        record = value.data if isinstance(value, ParameterRecord) else value
        if isinstance(record, TensorRecord):
            tensor = torch.empty(record.size, dtype=torch_dtype(record.dtype), device="meta")
            records[id(tensor)] = record
            return tensor
        if isinstance(value, dict):
            return {key: stand_in(item) for key, item in value.items()}
        if isinstance(value, list):
            return [stand_in(item) for item in value]
        return value

    if not isinstance(root, dict):
        raise TypeError(f"DCP output needs a dict at the root, not a {type(root).__name__}")
    flat, mappings = flatten_state_dict(stand_in(root))
    state_dict_metadata: dict[str, Any] = {}
    storage_data: dict[Any, Any] = {}
    written = WrittenFile(tensors_bytes=0, storages=0, file_bytes=0)
    with AtomicDirectory(destination, overwrite=overwrite) as directory:
        fd = directory.create(DATA_FILE)
        try:
            offset = 0
            for key, value in flat.items():
                record = records.get(id(value)) if isinstance(value, torch.Tensor) else None
                item = write_pt(index, record if record is not None else value, fd, "archive", backend, progress,
                                base=offset)
                if record is not None:
                    zeros = torch.Size([0] * len(record.size))
                    state_dict_metadata[key] = dcp_metadata.TensorStorageMetadata(
                        properties=dcp_metadata.TensorProperties(dtype=torch_dtype(record.dtype)),
                        size=torch.Size(record.size),
                        chunks=[dcp_metadata.ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(record.size))],
                    )
                    where = dcp_metadata.MetadataIndex(key, zeros, 0)
                    written.tensors_bytes += item.tensors_bytes
                    written.storages += item.storages
                else:
                    state_dict_metadata[key] = dcp_metadata.BytesStorageMetadata()
                    where = dcp_metadata.MetadataIndex(key)
                storage_data[where] = _StorageInfo(relative_path=DATA_FILE, offset=offset, length=item.file_bytes)
                offset += item.file_bytes
            os.fsync(fd)
        finally:
            os.close(fd)
        metadata = dcp_metadata.Metadata(
            state_dict_metadata=state_dict_metadata,
            planner_data=mappings,
            storage_data=storage_data,
            storage_meta=dcp_metadata.StorageMeta(checkpoint_id=destination, save_id=str(uuid.uuid4())),
            version=CURRENT_DCP_VERSION,
        )
        encoded = pickle.dumps(metadata)
        directory.write_small(METADATA_FILE, encoded)
    written.file_bytes = offset + len(encoded)
    return written
