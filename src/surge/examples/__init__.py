"""Runnable example applications (``surge run surge.examples.shop:app``)."""

__all__ = ()
