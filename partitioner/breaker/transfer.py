"""Moving tasks between a partition's queues on the broker, for the consumer gate's mover.

On Redis (6.2 or later) a move without new headers is one LMOVE of the list kombu keeps per
priority: atomic, so a task is moved exactly once. Otherwise (RabbitMQ, or a probe that
needs its header) the message is fetched, published to its new queue and only then
acknowledged.
"""

from __future__ import annotations

from typing import Any

from kombu import Connection

from partitioner.app import Partitioner


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
        channel = self.connection.default_channel
        # kombu's own naming of the list per priority step, and its key prefix, which its
        # client does not add to LMOVE.
        prefix = getattr(channel, "global_keyprefix", "")
        for step in channel.priority_steps:
            src = prefix + channel._q_for_pri(source, step)
            dst = prefix + channel._q_for_pri(destination, step)
            # kombu pushes on the left and pops on the right: right is the oldest end.
            if channel.client.lmove(src, dst, "RIGHT", "LEFT") is not None:
                return True
        return False
