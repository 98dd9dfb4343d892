"""Loading one source that is already open: the index, rename, plan, execute and sink
stages in order, for ``pyckpt.load`` and for each chunk file of a DCP checkpoint."""

from __future__ import annotations

from typing import Any

import torch

from ._backend import current_backend
from ._device import MapLocation
from .casting import cast_tree
from .errors import CheckpointError
from .execute import execute_plan
from .execute.direct import NOTHING, cpu_only, load_direct
from .index import index_opened
from .index.policy import GlobalsPolicy
from .index.source import BufferSource, Source
from .index.symbols import DType
from .plan import plan_index, plan_storages
from .rename import KeyMap, rename_tree
from .sinks.objects import build_objects


def load_opened(
    source: Source,
    map_location: MapLocation,
    *,
    mmap: bool | None,
    policy: GlobalsPolicy,
    key_map: KeyMap | None = None,
    target: DType | None = None,
) -> Any:
    """``load`` of a source already open (closed when done); ``target``: the cast's dtype."""
    backend = current_backend()
    shared_mapping = mmap is True and _mmap_shared()
    try:
        if cpu_only(map_location) and target is None:  # a plain checkpoint to CPU: one native pass, when it can
            direct = load_direct(source, backend, policy, mmap=mmap, shared_mapping=shared_mapping)
            if direct is not NOTHING:
                if isinstance(source, BufferSource):
                    source.leave_stream_at(source.size)
                source.close()  # the tensors keep the mapping, not the descriptor
                try:
                    return rename_tree(direct, key_map)
                except CheckpointError as exc:
                    raise exc.located(path=source.display)
        index = index_opened(source, backend, policy=policy)
    except BaseException:
        source.close()
        raise
    with index:
        try:
            root = cast_tree(rename_tree(index.root, key_map), target)
            can_map = index.source.path is not None
            if target is None:
                plans = plan_index(index, root, map_location, mmap=mmap, can_map=can_map)
            else:  # the cast stand-ins are in the tree, not in the index's storage table
                plans = plan_storages(root, map_location, mmap=mmap, can_map=can_map)
            storages = execute_plan(index, plans, map_location, backend, shared_mapping=shared_mapping)
            tensors = backend.make_tensors(index.tensor_records, storages) if target is None else None
            return build_objects(root, storages, tensors)
        except CheckpointError as exc:
            raise exc.located(path=index.display)
        except RecursionError:
            raise CheckpointError("object tree nests too deeply", path=index.display) from None


def _mmap_shared() -> bool:
    """Whether the user told torch to map checkpoints MAP_SHARED (``set_default_mmap_options``).

    Honoured for ``mmap=True`` only, as torch does; pyckpt's own default mapping (``mmap=None``)
    stays private, so writing to a loaded tensor never changes the file unless asked for.
    """
    import mmap as mmap_module

    get = getattr(torch.serialization, "get_default_mmap_options", None)
    return get is not None and get() == getattr(mmap_module, "MAP_SHARED", None)
