"""Shared part of the prompt widget's engines (``SamEngine``, :class:`.TiledEngine`); no Qt."""

from __future__ import annotations

from typing import Any


class ModelInfoMixin:
    """The model facts an engine exposes to the prompt widget, read from ``self.model``."""

    model: Any

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def max_points(self) -> int | None:
        return self.model.max_points

    @property
    def has_negative_point_embedding(self) -> bool:
        return bool(self.model.has_negative_point_embedding)
