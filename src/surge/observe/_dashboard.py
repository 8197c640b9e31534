"""The dashboard page served at ``/_surge/``: one self-contained document."""

from __future__ import annotations

__all__ = ("PAGE",)

PAGE = b"<!doctype html><title>surge</title><p>dashboard"
