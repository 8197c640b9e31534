"""The app's AsyncAPI 3.0 document: ``surge asyncapi module:app`` prints it,
and ``surge.asyncapi.mount(app.http)`` serves it at ``/asyncapi.json``.

An optional part above the ingress: it registers its route into
``app.http`` (:meth:`surge.http.Ingress.mount`); the ingress never imports it.
See :func:`document` for what the document holds.
"""

from __future__ import annotations

from .._graph import returned_types
from ._document import ASYNCAPI_VERSION, document
from ._endpoint import PATH, mount

__all__ = ("ASYNCAPI_VERSION", "PATH", "document", "mount", "returned_types")
