"""Stage 2 of the pipeline: rename state-dict keys (pure Python over strings).

A *state dict* here is any string-keyed mapping whose values are all tensors, wherever it
sits in the object tree. Other mappings (optimizer state keyed by ints, hyperparameters)
are left alone. Key order is kept, ``_metadata`` is renamed consistently, and two keys that
would become one are refused.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from .errors import CheckpointError, KeyCollisionError
from .index.opaque import Opaque
from .index.records import is_tensor_like

if TYPE_CHECKING:
    from torch import nn

LEADING_WRAPPERS = ("module.", "_orig_mod.")
INNER_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
AUTO = "auto"

RenameRules = Sequence[tuple[Union[str, "re.Pattern[str]"], str]]
KeyMap = Callable[[str], str]


def strip_auto(key: str) -> str:
    """Remove a leading run of ``module.`` / ``_orig_mod.`` and every FSDP/checkpoint segment."""
    while key.startswith(LEADING_WRAPPERS):
        key = key[key.index(".") + 1 :]
    # Two substring tests, not a loop: this runs once per key of every state dict renamed.
    if "_fsdp_wrapped_module" in key or "_checkpoint_wrapped_module" in key:
        key = ".".join(part for part in key.split(".") if part not in INNER_WRAPPERS)
    return key


def make_key_map(strip_prefix: str | None, rename: RenameRules | None) -> KeyMap | None:
    """The key function for ``strip_prefix`` and ``rename``, or None when both are off."""
    steps: list[KeyMap] = []
    if strip_prefix == AUTO:
        steps.append(strip_auto)
    elif strip_prefix:
        prefix = strip_prefix

        def strip_one(key: str) -> str:
            return key[len(prefix) :] if key.startswith(prefix) else key

        steps.append(strip_one)
    for pattern, replacement in rename or ():
        compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
        steps.append(lambda key, c=compiled, r=replacement: c.sub(r, key))
    if not steps:
        return None

    def key_map(key: str) -> str:
        for step in steps:
            key = step(key)
        return key

    return key_map


@dataclass
class RenameReport:
    renamed: int = 0
    mappings: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)


EXTRA_STATE_SUFFIX = "_extra_state"


def is_state_dict(value: Any) -> bool:
    """A non-empty mapping of names to tensors (``*._extra_state`` entries may be anything)."""
    return (
        isinstance(value, dict)
        and len(value) > 0
        and all(type(k) is str for k in value)
        and all(is_tensor_like(v) or k.endswith(EXTRA_STATE_SUFFIX) for k, v in value.items())
    )


def rename_tree(root: Any, key_map: KeyMap | None, report: RenameReport | None = None) -> Any:
    """Rename every state dict inside ``root`` (the tree is rebuilt only where it changes)."""
    if key_map is None:
        return root
    report = report if report is not None else RenameReport()
    return _rename(root, key_map, report, {})


def _rename(value: Any, key_map: KeyMap, report: RenameReport, done: dict[int, Any]) -> Any:
    if id(value) in done:
        return done[id(value)]
    # Objects may refer back to themselves (through opaque objects: a config node's parent):
    # a reference met again while its object is being renamed keeps pointing at the original.
    done[id(value)] = value
    result: Any
    if is_state_dict(value):
        result = rename_state_dict(value, key_map, report)
    elif isinstance(value, dict):
        result = value
        for key, item in value.items():
            new_item = _rename(item, key_map, report, done)
            if new_item is not item:
                if result is value:
                    result = copy_mapping(value)
                result[key] = new_item
    elif isinstance(value, Opaque):
        result = _rename_opaque(value, key_map, report, done)
    elif isinstance(value, (list, tuple)):
        # A plain loop, not a comprehension: one Python frame per nesting level.
        items = []
        for item in value:
            items.append(_rename(item, key_map, report, done))
        if all(a is b for a, b in zip(items, value)):
            result = value
        else:
            result = items if isinstance(value, list) else tuple(items)
    else:
        result = value
    done[id(value)] = result
    return result


def _rename_opaque(value: Opaque, key_map: KeyMap, report: RenameReport, done: dict[int, Any]) -> Opaque:
    """State dicts inside an opaque object's arguments or state; a copy only where one changed."""
    if not value.called:
        return value
    fields = (value.args, value.kwargs, value.state, value.items, value.dict_items)
    renamed = [_rename(field, key_map, report, done) for field in fields]
    if all(new is old for new, old in zip(renamed, fields)):
        return value
    args, kwargs, state, items, dict_items = renamed
    return Opaque(value.module, value.name, args, kwargs, new_object=value.new_object, state=state,
                  items=items, dict_items=dict_items)


def copy_mapping(value: dict[Any, Any]) -> dict[Any, Any]:
    copy = type(value)(value)
    extra = getattr(value, "__dict__", None)
    if extra:
        copy.__dict__.update(extra)
    return copy


def rename_state_dict(
    state_dict: dict[str, Any],
    key_map: KeyMap,
    report: RenameReport | None = None,
    *,
    module_map: KeyMap | None = None,
) -> dict[str, Any]:
    """One state dict with renamed keys (same mapping type, ``_metadata`` renamed too).

    ``module_map`` renames ``_metadata``'s module paths; by default a path ``p`` goes where
    the key ``p + "."`` goes.
    """
    result = type(state_dict)()
    renamed = 0
    for key, value in state_dict.items():
        new_key = key_map(key)
        if new_key in result:
            # Which key got there first is worked out only now: a table of origins for
            # 50,000 keys would be a tenth of a mapped load's memory.
            first = next(earlier for earlier in state_dict if key_map(earlier) == new_key)
            raise KeyCollisionError(
                f"keys '{first}' and '{key}' would both be renamed to '{new_key}'", key=key
            )
        result[new_key] = value
        if new_key != key:
            renamed += 1
            if report is not None and len(report.examples) < 5:
                report.examples.append((key, new_key))
    extra = dict(getattr(state_dict, "__dict__", {}))
    metadata = extra.pop("_metadata", None)
    if extra:
        result.__dict__.update(extra)
    if metadata is not None:
        result._metadata = rename_metadata(  # type: ignore[attr-defined]
            metadata, module_map or module_map_for(key_map)
        )
    if report is not None:
        report.renamed += renamed
        report.mappings += 1
    return result


def module_map_for(key_map: KeyMap) -> KeyMap:
    """Module paths renamed the way their parameters are: ``p`` goes where ``p + "."`` goes."""

    def module_map(path: str) -> str:
        if path == "":
            return ""
        renamed = key_map(path + ".")
        return renamed[:-1] if renamed.endswith(".") else renamed

    return module_map


def rename_metadata(metadata: Any, module_map: KeyMap) -> Any:
    """Rename ``_metadata``'s module paths, keeping torch's order (the root first).

    When a wrapper's entry and the entry of the module it wrapped land on one path (``""``
    and ``"module"`` after stripping ``module.``), the wrapped module's entry wins: it
    describes the module that owns the parameters. Among renamed entries, the later
    (deeper) one wins.
    """
    if not isinstance(metadata, dict):
        return metadata
    chosen: dict[Any, tuple[bool, Any]] = {}
    first_seen: dict[Any, int] = {}
    for position, (path, value) in enumerate(metadata.items()):
        new_path = module_map(path) if type(path) is str else path
        changed = new_path != path
        first_seen.setdefault(new_path, position)
        previous = chosen.get(new_path)
        if previous is not None and previous[0] and not changed:
            continue
        chosen[new_path] = (changed, value)
    ordered = sorted(chosen.items(), key=lambda item: first_seen[item[0]])
    return OrderedDict((path, value) for path, (_, value) in ordered)


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


ROOT = object()  # where locate_state_dict found the state dict when it is the whole checkpoint


def find_state_dict(root: Any, key: str | None) -> dict[str, Any]:
    """The model's state dict inside a checkpoint: ``root[key]``, the root, or a known entry.

    A pickled ``nn.Module`` (``torch.save(model)``, read in opaque mode) counts as its state
    dict, at the root or under any key.
    """
    return locate_state_dict(root, key)[1]


def locate_state_dict(root: Any, key: str | None) -> tuple[Any, dict[str, Any]]:
    """:func:`find_state_dict`, with the top-level key it was found under (or ``ROOT``)."""
    from .pickled_module import detach_record, is_pickled_module, module_state_dict

    def as_state_dict(value: Any) -> dict[str, Any] | None:
        if is_state_dict(value):
            return value  # type: ignore[no-any-return]
        if is_pickled_module(value):
            return module_state_dict(value, detach_record)
        return None

    if key is not None:
        if not isinstance(root, Mapping) or key not in root:
            available = ", ".join(repr(k) for k in root) if isinstance(root, Mapping) else "none"
            raise CheckpointError(f"no entry {key!r} in the checkpoint (top-level entries: {available})")
        found_at_key = as_state_dict(root[key])
        if found_at_key is None:
            raise CheckpointError(f"entry {key!r} is neither a mapping of names to tensors nor a pickled module")
        return key, found_at_key
    at_root = as_state_dict(root)
    if at_root is not None:
        return ROOT, at_root
    if isinstance(root, Mapping):
        for candidate in STATE_DICT_KEYS:
            if candidate in root:
                found = as_state_dict(root[candidate])
                if found is not None:
                    return candidate, found
        holders = [k for k, v in root.items() if is_state_dict(v) or is_pickled_module(v)]
        if len(holders) == 1:
            return holders[0], as_state_dict(root[holders[0]])  # type: ignore[return-value]
        if holders:
            raise CheckpointError(
                f"several entries hold state dicts ({', '.join(map(repr, holders))}); choose one with key="
            )
        raise CheckpointError(
            "no state dict found in the checkpoint (top-level entries: "
            f"{', '.join(repr(k) for k in root)}); name it with key="
        )
    what = root.qualified_name if isinstance(root, Opaque) else type(root).__name__
    raise CheckpointError(f"the checkpoint holds a {what}, not a state dict or a pickled module")


def key_matcher(state_dict: Mapping[str, Any], targets: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    """Map checkpoint keys onto the model's through wrapper prefixes on either side."""
    wanted = set(targets)
    by_canonical: dict[str, str | None] = {}
    for name in targets:
        canonical = strip_auto(name)
        by_canonical[canonical] = None if canonical in by_canonical else name

    def match(name: str) -> str:
        if name in wanted:
            return name
        found = by_canonical.get(strip_auto(name))
        return found if found is not None else name

    return match


def module_matcher(model: nn.Module):  # type: ignore[no-untyped-def]
    """Map checkpoint module paths (``_metadata``) onto the model's; the innermost wins."""
    paths = [name for name, _ in model.named_modules()]
    present = set(paths)
    by_canonical = {_canonical_module(path): path for path in paths}

    def match(path: str) -> str:
        if path in present:
            return path
        return by_canonical.get(_canonical_module(path), path)

    return match


def _canonical_module(path: str) -> str:
    return strip_auto(path + ".")[:-1] if path else ""
