"""What an unpickler run may accept: the one source of these rules for both VMs.

The Python VM reads them here; the native VM is handed them on every call (see
``native_bridge``), so no rule is written twice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .._env import max_pickle_objects

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
