"""Keys that a model ties to one memory, and which of them a load may fill directly.

torch's ``load_state_dict`` copies each key into its parameter in the model's order, so where
two keys are one memory (tied weights) the later key's bytes are what stay, even when the
checkpoint holds different bytes under the two and whatever order the files list them in.
A load that writes memory directly must end the same way without racing two reads into one
place: only the last key of such a group is filled; the earlier ones are left as it leaves
them. Where one key of a group cannot be treated as a plain copy (a module with its own
loading, ``assign``, a shape torch refuses), the whole group goes the staged way, where the
model's own ``load_state_dict`` copies them in its order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class TiedKeys:
    later: dict[str, str] = field(default_factory=dict)  # an earlier key of a group -> its last key
    staged: set[str] = field(default_factory=set)  # every key of a group no direct fill may touch


def tied_keys(
    targets: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...] | None], loads_plainly: Callable[[str], bool],
    *, assign: bool,
) -> TiedKeys:
    """``shapes``: the checkpoint's keys (renamed to the model's) with each tensor's shape, or
    None for a value that is not a plain tensor; ``loads_plainly``: whether a key's module
    loads its state as ``nn.Module`` does."""
    position = {name: at for at, name in enumerate(targets)}
    by_memory: dict[tuple[Any, ...], list[str]] = {}
    for name in shapes:
        target = targets.get(name)
        if type(target) in (torch.Tensor, nn.Parameter) and target.numel() > 0 and target.device.type != "meta":
            memory = (target.device, target.data_ptr(), target.dtype, tuple(target.shape), tuple(target.stride()))
            by_memory.setdefault(memory, []).append(name)
    tied = TiedKeys()
    for group in by_memory.values():
        if len(group) < 2:
            continue
        group.sort(key=position.__getitem__)
        plain = not assign and all(
            loads_plainly(name) and shapes[name] == tuple(targets[name].shape) for name in group
        )
        if plain:
            tied.later.update((name, group[-1]) for name in group[:-1])
        else:
            tied.staged.update(group)
    return tied

