"""Every ``PYCKPT_*`` run-time switch is read here, and nowhere else.

A leaf module (it imports nothing of pyckpt), so the backend, the executors and the index
can all read their settings without importing each other.
"""

from __future__ import annotations

import os


def env_flag(name: str) -> bool:
    """An on/off environment switch (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_positive(name: str, default: int) -> int:
    """A positive-integer environment setting, or ``default`` when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, not {text!r}")
    return value


def io_threads() -> int:
    """Reader threads: ``PYCKPT_THREADS``, else one per CPU up to 8."""
    return env_positive("PYCKPT_THREADS", max(1, min(8, os.cpu_count() or 1)))


def max_pickle_objects() -> int:
    """Values one pickle may push or memoise: ``PYCKPT_MAX_OBJECTS``, else 2**25.

    A tensor in a state dict costs about 30, so 2**25 is a million tensors' worth, ten times
    the largest state dicts shipped today, while a hostile pickle that asks for more is
    stopped after a few hundred megabytes instead of exhausting memory.
    """
    return env_positive("PYCKPT_MAX_OBJECTS", 1 << 25)


def explicit_max_objects() -> bool:
    """Whether ``PYCKPT_MAX_OBJECTS`` is set (then it is the only bound on a pickle's values)."""
    return bool(os.environ.get("PYCKPT_MAX_OBJECTS", "").strip())
