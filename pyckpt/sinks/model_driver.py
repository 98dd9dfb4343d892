"""The sink of ``load_state_dict``: torch's own ``model.load_state_dict``, in linear time."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys


def load_into_model(model: nn.Module, state_dict: Any, *, strict: bool, assign: bool) -> Any:
    """``model.load_state_dict(state_dict, strict=strict, assign=assign)``, in linear time.

    torch's own driver gives each child module the entries of its parent's dict that start
    with the child's prefix by scanning the whole parent dict: a ModuleList of 6,000 blocks
    under a 50,000-key dict costs 300 million comparisons (a minute) before any byte moves.
    This driver is torch's, step for step (every module's own ``_load_from_state_dict``, the
    same local dicts in the same order, post hooks, strict handling, the same messages),
    except that each parent's dict is split by child name in one pass. A model that
    overrides ``load_state_dict`` gets its own.
    """
    if type(model).load_state_dict is not nn.Module.load_state_dict:
        return model.load_state_dict(state_dict, strict=strict, assign=assign)
    metadata = getattr(state_dict, "_metadata", None)
    state_dict = OrderedDict(state_dict)
    if metadata is not None:
        state_dict._metadata = metadata  # type: ignore[attr-defined]
    walk = _ModuleWalk(metadata, assign)
    walk.load(model, state_dict, "")
    missing_keys, unexpected_keys, error_msgs = walk.missing_keys, walk.unexpected_keys, walk.error_msgs
    if strict:
        if unexpected_keys:
            error_msgs.insert(
                0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected_keys))
            )
        if missing_keys:
            error_msgs.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing_keys)))
    if error_msgs:
        raise RuntimeError(
            "Error(s) in loading state_dict for {}:\n\t{}".format(model.__class__.__name__, "\n\t".join(error_msgs))
        )
    return _IncompatibleKeys(missing_keys, unexpected_keys)


class _ModuleWalk:
    """torch's recursive ``load`` over the module tree, as an object rather than a closure that
    calls itself: such a closure is a reference cycle left to the garbage collector."""

    def __init__(self, metadata: Any, assign: bool) -> None:
        self.metadata = metadata
        self.assign = assign
        self.missing_keys: list[str] = []
        self.unexpected_keys: list[str] = []
        self.error_msgs: list[str] = []

    def load(self, module: nn.Module, local_state_dict: dict[str, Any], prefix: str) -> None:
        local_metadata = {} if self.metadata is None else self.metadata.get(prefix[:-1], {})
        if self.assign:
            local_metadata["assign_to_params_buffers"] = self.assign
        module._load_from_state_dict(
            local_state_dict, prefix, local_metadata, True, self.missing_keys, self.unexpected_keys, self.error_msgs
        )
        children = module._modules
        if children:
            by_child: dict[str, dict[str, Any]] = {}
            start = len(prefix)
            for key, value in local_state_dict.items():
                dot = key.find(".", start)
                if dot > start and key.startswith(prefix):
                    name = key[start:dot]
                    if name in children:
                        by_child.setdefault(name, {})[key] = value
            for name, child in children.items():
                if child is not None:
                    self.load(child, by_child.get(name, {}), prefix + name + ".")
        incompatible_keys = _IncompatibleKeys(self.missing_keys, self.unexpected_keys)
        for hook in module._load_state_dict_post_hooks.values():
            out = hook(module, incompatible_keys)
            if out is not None:
                raise AssertionError(
                    "Hooks registered with ``register_load_state_dict_post_hook`` are not "
                    "expected to return new values, if incompatible_keys need to be modified, "
                    "it should be done inplace."
                )
