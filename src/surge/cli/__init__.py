"""The ``surge`` command and the supervisor of ``surge run --workers N``.

::

    surge run module:app [--transport URL] [--workers N] [--http HOST:PORT]
    surge demo [--requests N] [--concurrency C] [--report PATH] [--in-process]
    surge dlq list|show|replay|purge module:app [--subscription S] [--id ID ...]
    surge load URL [-n N] [-c C] [--rate R]
    surge top URL_OR_MODULE:APP
    surge relay POSTGRES_URL TARGET_URL [--topic PATTERN ...] [--declare-only]

The top of the package graph: commands import the core, the transports,
``surge.http``, ``surge.observe`` and ``surge.tools``; nothing imports them.
"""

from ._commands import load_app, main

__all__ = ("load_app", "main")
