"""The one place that turns a device argument (``map_location``, ``device=``) into a device.

``map_location`` has torch's forms and meaning: None keeps each storage's saved location,
a string or ``torch.device`` sends everything there, a dict maps saved locations, and a
callable ``f(storage, location)`` may return a storage (or None for the default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch

MapLocation = Union[None, str, bytes, torch.device, dict, Callable[[Any, str], Any]]


def check_map_location(map_location: Any) -> None:
    if map_location is None or isinstance(map_location, (str, bytes, torch.device, dict)):
        return
    if callable(map_location):
        return
    raise TypeError(
        "map_location must be None, a string, a torch.device, a dict or a callable, "
        f"not {type(map_location).__name__}"
    )


def target_location(map_location: MapLocation, saved_location: str) -> str | None:
    """Where a storage saved at ``saved_location`` goes, as torch's location string.

    Returns None when ``map_location`` is a callable: it must see the storage itself.
    """
    if map_location is None:
        return saved_location
    if isinstance(map_location, dict):
        mapped = map_location.get(saved_location, saved_location)
        return str(mapped) if isinstance(mapped, torch.device) else _text(mapped)
    if isinstance(map_location, (str, bytes)):
        return _text(map_location)
    if isinstance(map_location, torch.device):
        return str(map_location)
    return None


def _text(value: str | bytes) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def location_device(location: str) -> torch.device | None:
    """The device a location string names, or None when torch's restore logic must decide."""
    try:
        device = torch.device(location)
    except (RuntimeError, ValueError):
        return None
    return device if device.type in ("cpu", "cuda", "meta") else None
