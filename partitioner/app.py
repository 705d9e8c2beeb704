"""Attaching Partitioner to a Celery app: routes, queues and the settings that keep tasks safe."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Queue

from partitioner import embedded
from partitioner.breaker.board import Breakers
from partitioner.breaker.producer import ProducerGate
from partitioner.breaker.stores.redis import RedisStore
from partitioner.breaker.view import BreakerView
from partitioner.errors import BrokerError, PartitionerError
from partitioner.routing import Router, declare_queues
from partitioner.settings import Origins, Settings, load_settings, mask_url
from partitioner.topology import Topology

log = logging.getLogger(__name__)

# Set by `partitioner launch` in each worker it starts: the worker's node name.
WORKER_ENV = "PARTITIONER_WORKER"
# A publish waits at most this long for the breaker store before on_store_error applies.
STORE_TIMEOUT_S = 1.0
# How soon a Redis worker starts reading a queue the consumer gate adds.
QUEUE_ADD_WAIT_S = 0.1


@dataclass
class Partitioner:
    """What `attach` installed on an app: its settings, topology, queues and router."""

    app: Celery
    settings: Settings
    topology: Topology
    queues: dict[str, Queue]
    router: Router
    broker_url: str | None
    # The broker named by settings or by the app itself; None means the embedded server.
    configured_broker: str | None = None
    breakers: Breakers | None = None
    view: BreakerView | None = None

    def find_broker(self) -> str:
        """The broker URL; with none known, look again for an embedded server.

        Raises `BrokerError` when there is none, rather than let Celery fall back to
        amqp://localhost and publish to, or count the queues of, some other broker.
        """
        if self.broker_url is not None:
            return self.broker_url
        found = embedded.discover(self.settings.state_dir)
        if not found:
            raise BrokerError(
                "no broker: PARTITIONER_BROKER_URL is not set and no embedded server "
                f"runs in {self.settings.state_dir}; start one with `partitioner launch`, "
                "or set PARTITIONER_BROKER_URL"
            )
        self.use_broker(found)
        return found

    def use_broker(self, url: str) -> None:
        """Make `url` the app's broker (the embedded server, once it is known)."""
        self.broker_url = self.app.conf.broker_url = url
        self.router.before_route = None
        self.install_breakers()

    def install_breakers(self) -> None:
        """Open the breakers' store and put the producer gate in the router.

        The store is `state_url`, else the broker when it is Redis; with neither, the
        breakers are off and one warning says what to set.
        """
        if self.breakers is not None or not any(
            p.breaker.enabled for p in self.topology.partitions
        ):
            return
        client = self.state_client()
        if client is None:
            log.warning(
                "breakers are off: they keep their state in Redis and the broker %s is not "
                "Redis; set PARTITIONER_STATE_URL",
                mask_url(self.broker_url),
            )
            return
        store = RedisStore(client, self.settings.name)
        self.breakers = Breakers(store, self.topology)
        self.view = BreakerView(self.breakers, client, store.channel)
        self.router.gate = ProducerGate(self.breakers, self.view)

    def state_client(self) -> redis.Redis | None:
        """A client of the shared state's Redis: `state_url`, else a Redis broker, else None."""
        url = self.settings.state_url or (self.broker_url if self.broker_is_redis else None)
        if url is None:
            return None
        return redis.Redis.from_url(
            url.replace("redis+socket://", "unix://", 1),
            socket_timeout=STORE_TIMEOUT_S,
            socket_connect_timeout=STORE_TIMEOUT_S,
        )

    @property
    def broker_is_redis(self) -> bool:
        """True when the broker speaks the Redis protocol (Redis, Valkey, embedded)."""
        return is_redis_url(self.broker_url or self.app.conf.broker_url)


def attach(
    app: Celery, settings: Settings | None = None, origins: Origins | None = None
) -> Partitioner:
    """Install Partitioner's routing and queues on `app` and return what was installed.

    With no `settings`, they are read from `PARTITIONER_CONFIG`, `.env` and `PARTITIONER_*`
    variables. Raises `SettingsError` naming any bad setting before anything is changed.
    """
    if settings is None:
        settings, origins = load_settings()
    topology = Topology.from_settings(settings, origins)
    queues = declare_queues(topology)
    router = Router(topology, queues, in_worker_task=lambda: app.current_worker_task is not None)
    # The broker: PARTITIONER_BROKER_URL, else the app's own, else the embedded server.
    configured = settings.broker_url or app.conf.broker_url or None
    broker_url = configured or embedded.discover(settings.state_dir)

    app.conf.update(_celery_settings(app, queues, router, broker_url))
    worker = os.environ.get(WORKER_ENV)
    if worker:
        app.conf.update(_worker_settings(app, worker, broker_url or app.conf.broker_url))
        _register_worker_side(app)

    partitioner = Partitioner(app, settings, topology, queues, router, broker_url, configured)
    if broker_url is None:
        # The embedded server may start after this app is imported (by `partitioner
        # launch` in another process): find it on first publish.
        router.before_route = partitioner.find_broker
    elif topology.partitions:
        partitioner.install_breakers()
    app.partitioner = partitioner
    log.debug("attached to %s: broker %s", app.main, mask_url(broker_url))
    return partitioner


def _register_worker_side(app: Celery) -> None:
    # In every launched worker: the remote commands that observe and resize it, and its
    # consumer steps, the gate (breaker and pause) and the pool (its target).
    from partitioner import observe
    from partitioner.breaker.consumer import ConsumerGate
    from partitioner.supervisor import pool

    observe.register()
    pool.register()
    app.steps["consumer"].update((ConsumerGate, pool.PoolStep))


def partitioner_of(app: Celery) -> Partitioner:
    """The `Partitioner` attached to `app`; raises if `attach` was never called on it."""
    found = getattr(app, "partitioner", None)
    if not isinstance(found, Partitioner):
        raise PartitionerError(
            f"Celery app {app.main!r} has no partitioner attached; call "
            "partitioner.attach(app) in the module that creates it"
        )
    return found


def is_redis_url(url: str | None) -> bool:
    """True for URLs of the Redis transport."""
    return bool(url) and urlsplit(str(url)).scheme.startswith(("redis", "rediss"))


def _celery_settings(
    app: Celery, queues: dict[str, Queue], router: Router, broker_url: str | None
) -> dict[str, Any]:
    topology = router.topology
    # The app's own queues and routes stay: a queue of the same name keeps its own
    # declaration (arguments included), and its routes apply to what no partition claims.
    own_queues = [q for q in app.conf.task_queues or () if q.name not in queues]
    declared = {q.name: q for q in app.conf.task_queues or () if q.name in queues}
    queues.update(declared)
    own_routes = app.conf.task_routes
    own_routes = (
        []
        if own_routes is None
        else (list(own_routes) if isinstance(own_routes, (list, tuple)) else [own_routes])
    )
    # The breakers' probe and parking queues stay out of task_queues, so that a worker
    # started without -Q does not consume them, and `celery purge` does not empty them.
    breaker_queues = {q for p in topology.partitions for q in p.breaker_queues}
    consumed = [q for name, q in queues.items() if name not in breaker_queues]
    conf: dict[str, Any] = {
        "task_queues": [*consumed, *own_queues],
        "task_routes": (router, *own_routes),
        # JSON only: a broker message must never be able to run pickle on a worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acknowledged after it ran, and re-queued when its process dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
    }
    if topology.default is not None:
        conf["task_default_queue"] = topology.default.queue
    if broker_url:
        conf["broker_url"] = broker_url
    return conf


def _worker_settings(app: Celery, worker: str, broker_url: str | None) -> dict[str, Any]:
    partition = worker.split("@", 1)[0]
    conf: dict[str, Any] = {
        "worker_log_format": f"[%(asctime)s: %(levelname)s/{partition}/%(processName)s] "
        "%(message)s",
        "worker_task_log_format": f"[%(asctime)s: %(levelname)s/{partition}/%(processName)s] "
        "%(task_name)s[%(task_id)s]: %(message)s",
    }
    if is_redis_url(broker_url):
        # NOTE: kombu keeps unacknowledged Redis messages in one hash per key name and gives
        # them back only after visibility_timeout (1 h). A key per worker lets the launcher
        # give back a dead worker's tasks the moment it restarts it. kombu restores only
        # from a consumer's own key, so the tasks of a worker whose name never runs again
        # stay unacknowledged until a launcher with the same --hostname starts.
        options = dict(app.conf.broker_transport_options or {})
        # kombu adds a queue to its blocking read only when the read times out, so the
        # consumer gate's resume waited up to 1 s (kombu's default) before the first task.
        options.setdefault("polling_interval", QUEUE_ADD_WAIT_S)
        conf["broker_transport_options"] = options | unacked_keys(worker)
    return conf


def unacked_keys(worker: str) -> dict[str, str]:
    """kombu transport options that keep `worker`'s unacknowledged messages apart."""
    return {
        "unacked_key": f"unacked:{worker}",
        "unacked_index_key": f"unacked_index:{worker}",
        "unacked_mutex_key": f"unacked_mutex:{worker}",
    }
