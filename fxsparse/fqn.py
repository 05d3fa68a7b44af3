"""Fully qualified names ("layer1.0.conv1.weight"): the one way fxsparse joins them."""

from __future__ import annotations


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty (the root module's prefix is "")."""
    return f"{prefix}.{name}" if prefix and name else prefix or name
