"""What every kind of conversion shares: its report, the output formats, the view check,
safetensors metadata from a training checkpoint's entries, and byte progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._units import human_bytes
from .errors import CheckpointError
from .float_cast import casts
from .index.records import TensorRecord, describe_value
from .index.symbols import DType
from .index.safetensors_format import METADATA_KEY
from .plan import check_view, iter_records
from .rename import ROOT

FORMAT_PT = "pt"
FORMAT_SAFETENSORS = "safetensors"
FORMAT_DCP = "dcp"


@dataclass
class ConvertReport:
    """What a conversion did."""

    source: str
    destination: str
    format: str
    tensors: int
    storages: int
    tensor_bytes: int
    file_bytes: int
    renamed_keys: int
    seconds: float
    examples: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.tensor_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        return (
            f"converted {self.source} -> {self.destination} ({self.format}): {self.tensors} tensors, "
            f"{human_bytes(self.tensor_bytes)}, {self.renamed_keys} keys renamed, {self.seconds:.2f} s ({rate:.2f} GB/s)"
        )


def output_format(destination: str, requested: str | None, *, sharded: bool = False) -> str:
    """The format asked for, else the one DST's extension names (pt by default; safetensors
    for sharded output, as Hugging Face shards are)."""
    if requested is None:
        return FORMAT_SAFETENSORS if sharded or destination.endswith(".safetensors") else FORMAT_PT
    if requested not in (FORMAT_PT, FORMAT_SAFETENSORS, FORMAT_DCP):
        raise ValueError(f"format must be 'pt', 'safetensors' or 'dcp', not {requested!r}")
    return requested


def storage_bytes(index: Any, target: DType | None = None) -> int:
    """Every storage byte of an index, floating-point ones counted as ``target`` elements:
    what a conversion writes, at most."""
    if target is None:
        return sum(record.nbytes for record in index.storages.values())
    return sum(
        record.nbytes // record.dtype.itemsize * target.itemsize if casts(record.dtype, target) else record.nbytes
        for record in index.storages.values()
    )


class ByteProgress:
    """Counts bytes written and reports ``(done, total)`` to the caller's callback."""

    def __init__(self, total: int, callback: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback

    @classmethod
    def of_index(
        cls, index: Any, callback: Callable[[int, int], None] | None, target: DType | None = None
    ) -> ByteProgress:
        """Progress over every storage byte of ``index`` (as written after a cast to ``target``)."""
        return cls(storage_bytes(index, target), callback)

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self.callback is not None:
            self.callback(self.done, max(self.total, self.done))


def check_all_views(root: Any) -> int:
    count = 0
    for path, record in iter_records(root):
        if isinstance(record, TensorRecord):
            check_view(record, path)
            count += 1
    return count


def metadata_entries(root: Any, found_under: Any, drop_extra: bool) -> tuple[dict[str, str], list[str]]:
    """Top-level entries beside the state dict, as safetensors metadata (strings and numbers)."""
    if found_under is ROOT or not isinstance(root, dict):
        return {}, []
    metadata: dict[str, str] = {}
    lost: list[str] = []
    for name, value in root.items():
        if name == found_under:
            continue
        if isinstance(name, str) and type(value) in (str, int, float, bool):
            metadata[name] = str(value)
        else:
            lost.append(f"{name!r} ({describe_value(value)})")
    if lost and not drop_extra:
        raise CheckpointError(
            "safetensors can only keep string and number entries beside the state dict; these "
            f"would be lost: {', '.join(lost)} (pass --drop-extra to drop them, or convert to pt)"
        )
    return metadata, lost


def kept_metadata(
    index: Any, chosen: str, root: Any, found_under: Any, drop_extra: bool
) -> tuple[dict[str, str], list[str]]:
    """What the output keeps as ``__metadata__`` (safetensors only: ``format: pt``, the
    source's own, and the string and number entries beside the state dict found under
    ``found_under``), and what the report lists as dropped."""
    own = dict(index.metadata or {})
    if chosen != FORMAT_SAFETENSORS:
        return {}, [f"{METADATA_KEY} ({len(own)} strings: only safetensors output keeps them)"] if own else []
    entries, dropped = metadata_entries(root, found_under, drop_extra)
    # "format": "pt" as Hugging Face's save_pretrained writes it: huggingface_hub refuses a
    # safetensors header whose metadata names no format (or another than pt or mlx).
    return {"format": "pt", **own, **entries}, dropped
