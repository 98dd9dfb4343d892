"""Stage 4 of the pipeline: carry out a storage plan, producing one storage per plan entry."""

from __future__ import annotations

from .storages import execute_plan

__all__ = ["execute_plan"]
