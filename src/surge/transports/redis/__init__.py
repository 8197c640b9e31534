"""Redis Streams (``pip install 'surge[redis]'``): see ``_transport``."""

from ._transport import RedisTransport

__all__ = ("RedisTransport",)
