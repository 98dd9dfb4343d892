"""What an unpickler run may accept: the one source of these rules for both VMs.

The Python VM reads them here; the native VM is handed them on every call (see
``native_bridge``), so no rule is written twice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

from .._env import explicit_max_objects, max_pickle_objects

UNKNOWN_ERROR = "error"
UNKNOWN_OPAQUE = "opaque"
UNKNOWN_MODES = (UNKNOWN_ERROR, UNKNOWN_OPAQUE)

# Modules torch's unpickler always refuses, and so does pyckpt in every mode.
BLOCKED_MODULES = ("sys", "os", "posix", "nt")

# Python 2 module names that pickle maps for protocol-2 files (``_compat_pickle``).
PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

# Containers may nest this deep in the object tree (the VMs never recurse; the stages after
# them walk trees with explicit stacks or bounded recursion).
MAX_NESTING = 512


@dataclass(frozen=True)
class GlobalsPolicy:
    """How globals beyond torch's allowlist are treated.

    Attributes:
        unknown: ``"error"`` refuses them (``torch.load(weights_only=True)`` parity);
            ``"opaque"`` keeps each as an inert :class:`~pyckpt.Opaque` record.
        trusted: names registered with ``torch.serialization.add_safe_globals``: accepted in
            every mode, recorded as Opaque and rebuilt for real when the tree is built.
        list_blocked: for inspection only: globals of blocked modules become Opaque records
            too, so they can be reported (such a tree is never built into objects).
        max_objects: values one pickle may push onto its stack or store in its memo. Every
            object and every container item passes through the stack, so this bounds the
            memory and time an index can take.
    """

    unknown: str = UNKNOWN_ERROR
    trusted: frozenset[str] = field(default_factory=frozenset)
    list_blocked: bool = False
    max_objects: int = field(default_factory=max_pickle_objects)

    @property
    def opaque(self) -> bool:
        return self.unknown == UNKNOWN_OPAQUE or self.list_blocked


# A DEFLATE'd pickle may push at most this many values per byte it occupies in the file.
# torch never compresses data.pkl, and re-zipped real ones push 1.3 to 1.5 values per
# compressed byte (state dicts and training checkpoints alike), while a bomb pushes thousands:
# a 300 KB file that inflates to a list of 10**8 elements is stopped after about 5 million.
MAX_VALUES_PER_COMPRESSED_BYTE = 16
MIN_VALUES = 1 << 20


def for_compressed_pickle(policy: GlobalsPolicy, compressed_size: int) -> GlobalsPolicy:
    """The policy for a pickle stored with DEFLATE: its values bounded by its stored size too,
    so the work an index does stays proportional to the bytes of the file."""
    if explicit_max_objects():
        return policy  # the user set PYCKPT_MAX_OBJECTS: that is the only limit
    limit = max(MIN_VALUES, MAX_VALUES_PER_COMPRESSED_BYTE * compressed_size)
    return replace(policy, max_objects=min(policy.max_objects, limit))


def check_unknown_mode(mode: object) -> str:
    if mode not in UNKNOWN_MODES:
        raise ValueError(f"unknown_globals must be 'error' or 'opaque', not {mode!r}")
    return mode  # type: ignore[return-value]


def trusted_globals() -> frozenset[str]:
    """Names the user registered with torch (``add_safe_globals`` / ``safe_globals``).

    Read without importing torch: a process that never imported torch registered nothing.
    """
    unpickler = sys.modules.get("torch._weights_only_unpickler")
    get = getattr(unpickler, "_get_user_allowed_globals", None)
    if get is None:
        return frozenset()
    return frozenset(get())


def policy_for(unknown: str = UNKNOWN_ERROR, *, list_blocked: bool = False) -> GlobalsPolicy:
    return GlobalsPolicy(check_unknown_mode(unknown), trusted_globals(), list_blocked)
