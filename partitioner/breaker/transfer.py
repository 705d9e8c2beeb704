"""Moving tasks between a partition's queues on the broker, for the consumer gate's mover.

On Redis a move without new headers is one LMOVE per priority list: atomic, so a task is
moved exactly once. Otherwise (RabbitMQ, or a probe that needs its header) the message is
fetched, published to its new queue and only then acknowledged.
"""

from __future__ import annotations

from typing import Any

from kombu import Connection

from partitioner.app import Partitioner

# kombu's Redis transport keeps a list per priority step: "<queue>\x06\x16<step>".
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


class Transfer:
    """A connection of its own to the broker, and the moves the mover makes with it."""

    def __init__(self, partitioner: Partitioner) -> None:
        self.partitioner = partitioner
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = self.partitioner.app.connection_for_write()
            self._connection.ensure_connection(max_retries=3)
        return self._connection

    def waiting(self, queue: str) -> int:
        """Messages waiting in `queue`."""
        bound = self.partitioner.queues[queue].bind(self.connection.default_channel)
        return int(bound.queue_declare().message_count)

    def move(self, source: str, destination: str, headers: dict[str, Any] | None = None) -> bool:
        """Move the oldest task of `source` to `destination`; False if there was none."""
        if headers is None and self.partitioner.broker_is_redis:
            return self._lmove(source, destination)
        channel = self.connection.default_channel
        message = self.partitioner.queues[source].bind(channel).get(no_ack=False)
        if message is None:
            return False
        target = self.partitioner.queues[destination]
        properties = {
            key: message.properties[key]
            for key in ("correlation_id", "reply_to", "priority")
            if message.properties.get(key) is not None
        }
        self.connection.Producer(channel).publish(
            message.body,
            exchange=target.exchange,
            routing_key=target.routing_key,
            headers={**message.headers, **(headers or {})},
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            declare=[target],
            **properties,
        )
        message.ack()
        return True

    def _lmove(self, source: str, destination: str) -> bool:
        client = self.connection.default_channel.client
        for step in REDIS_PRIORITY_STEPS:
            suffix = f"{REDIS_PRIORITY_SEP}{step}" if step else ""
            # kombu pushes on the left and pops on the right: right is the oldest end.
            if client.lmove(source + suffix, destination + suffix, "RIGHT", "LEFT") is not None:
                return True
        return False
