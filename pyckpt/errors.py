"""The one exception hierarchy of pyckpt.

Every problem with the *input* (a hostile, damaged or unsupported checkpoint) is a
:class:`CheckpointError`. Both backends raise it with the same message, which always names
the file and, where it applies, the zip record or the state-dict key.
"""

from __future__ import annotations

import pickle


class CheckpointError(RuntimeError):
    """A checkpoint could not be read safely and exactly.

    Attributes:
        path: the file (or ``"<buffer>"``) the problem was found in, when known.
        record: the zip record, when the problem sits in one.
        key: the key in the loaded object, when the problem sits under one.
        problem: the bare description, without the location prefix.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | None = None,
        record: str | None = None,
        key: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = path
        self.record = record
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.record is not None:
            where.append(f"record '{self.record}'")
        if self.key is not None:
            where.append(f"key '{self.key}'")
        return ": ".join(where + [self.problem])

    def located(
        self, *, path: str | None = None, record: str | None = None, key: str | None = None
    ) -> CheckpointError:
        """Fill in location fields that are still unknown; returns self for ``raise ... from``."""
        if self.path is None and path is not None:
            self.path = path
        if self.record is None and record is not None:
            self.record = record
        if self.key is None and key is not None:
            self.key = key
        self.args = (self._format(),)
        return self


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint asks for something the weights-only rules refuse (a global, an opcode).

    It is also a ``pickle.UnpicklingError``, the error ``torch.load(weights_only=True)``
    raises for the same files, so code written against torch catches it unchanged.
    """


class TruncatedCheckpointError(CheckpointError):
    """The data ended before the structure it was describing did."""


class KeyCollisionError(CheckpointError):
    """Renaming mapped two different keys onto one."""


class ExtensionUnavailableError(ImportError):
    """The native extension was required (``PYCKPT_REQUIRE_EXT=1``) but could not be loaded."""


_announced_fallbacks: set[str] = set()


def announce_fallback(message: str) -> None:
    """No silent fallback to a slower path: refused under ``PYCKPT_REQUIRE_EXT=1``, otherwise
    warned about once per message, at the caller of the function that falls back."""
    from ._env import env_flag

    if env_flag("PYCKPT_REQUIRE_EXT"):
        raise ExtensionUnavailableError(f"{message} (PYCKPT_REQUIRE_EXT=1 forbids the fallback)")
    if message not in _announced_fallbacks:
        _announced_fallbacks.add(message)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=4)
