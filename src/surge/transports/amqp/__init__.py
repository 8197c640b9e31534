"""The RabbitMQ transport (``amqp://``, ``amqps://``): ``pip install 'surge[amqp]'``."""

from ._transport import AmqpTransport

__all__ = ("AmqpTransport",)
