"""attach() on a Celery app: routing through Celery's router, and safe settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Queue

from partitioner.app import Partitioner, attach, partitioner_of
from partitioner.errors import BrokerError, PartitionerError, RoutingError
from partitioner.settings import PartitionSettings, Settings, mask_url

pytestmark = pytest.mark.usefixtures("hermetic")

# Port 1 refuses connections: had a task reached the publish step, it would fail there
# with a kombu error after connection retries, not with a RoutingError at once.
CLOSED_BROKER = "redis://127.0.0.1:1/0"


BROKER = "redis://127.0.0.1:6379/15"  # never connected to
ORDER_QUEUES = ["orders", "orders_bulk"]


def shop_settings(broker_url: str = BROKER, **extra: PartitionSettings) -> Settings:
    partitions = {
        "payment": PartitionSettings(tasks=["shop.payment.*"]),
        "order": PartitionSettings(tasks=["shop.order.*"], queues=ORDER_QUEUES),
    }
    return Settings(broker_url=broker_url, partitions=partitions | extra)


def attached(settings: Settings | None = None) -> Partitioner:
    app = Celery("t", set_as_current=False)
    return attach(app, settings=settings or shop_settings())


def test_router_returns_the_partition_queue() -> None:
    partitioner = attached()

    found = partitioner.router("shop.payment.charge", (), {}, {})

    assert found == {"queue": partitioner.queues["payment"]}
    queue = found["queue"]
    assert isinstance(queue, Queue)
    assert queue.name == queue.exchange.name == queue.routing_key == "payment"


def test_celery_router_resolves_task_to_partition_queue() -> None:
    app = attached().app

    options = app.amqp.router.route({}, "shop.payment.charge")

    assert options["queue"].name == "payment"


def test_tasks_go_to_the_first_of_several_queues() -> None:
    app = attached().app

    assert app.amqp.router.route({}, "shop.order.create")["queue"].name == "orders"


def test_queues_are_declared_on_the_app() -> None:
    app = attached().app

    assert [q.name for q in app.conf.task_queues] == ["payment", *ORDER_QUEUES]


def test_celery_builtin_tasks_fall_through() -> None:
    partitioner = attached()

    assert partitioner.router("celery.chord_unlock", (), {}, {}) is None
    assert partitioner.router("celery.backend_cleanup", (), {}, {}) is None


def test_celery_builtin_task_claimed_by_a_partition_is_routed() -> None:
    settings = shop_settings(chords=PartitionSettings(tasks=["celery.chord_unlock"]))

    found = attached(settings).router("celery.chord_unlock", (), {}, {})

    assert found is not None
    assert found["queue"].name == "chords"


def test_default_partition_becomes_the_default_queue() -> None:
    settings = shop_settings(default=PartitionSettings())

    app = attached(settings).app

    assert app.conf.task_default_queue == "default"
    assert app.amqp.router.route({}, "shop.unknown.task")["queue"].name == "default"


Published = list[tuple[str, str]]


def record_publishes(app: Celery, monkeypatch: pytest.MonkeyPatch) -> Published:
    """Replace the publish step of `app`; return the (task, queue) pairs it is given."""
    published: Published = []

    def send_task_message(producer: Any, name: str, *args: Any, **kwargs: Any) -> None:
        published.append((name, kwargs["queue"].name))

    monkeypatch.setattr(app.amqp, "send_task_message", send_task_message)
    return published


@pytest.mark.timeout(10)
def test_known_task_is_published_to_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    app = attached(shop_settings(CLOSED_BROKER)).app
    published = record_publishes(app, monkeypatch)

    app.send_task("shop.payment.charge")

    assert published == [("shop.payment.charge", "payment")]


@pytest.mark.timeout(10)
def test_unknown_task_is_refused_by_send_task_before_publishing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = attached(shop_settings(CLOSED_BROKER)).app
    published = record_publishes(app, monkeypatch)

    with pytest.raises(RoutingError, match=r"'shop\.unknown\.task'"):
        app.send_task("shop.unknown.task")

    assert published == []


@pytest.mark.timeout(10)
def test_unknown_task_is_refused_by_apply_async_before_publishing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = attached(shop_settings(CLOSED_BROKER)).app
    published = record_publishes(app, monkeypatch)

    @app.task(name="shop.unknown.task")
    def unknown() -> None: ...

    with pytest.raises(RoutingError, match=r"partitions\.<name>\.tasks"):
        unknown.apply_async()

    assert published == []


def test_attach_sets_safe_celery_settings() -> None:
    conf = attached().app.conf

    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_url == BROKER


def test_partitioner_of_finds_what_attach_installed() -> None:
    partitioner = attached()

    assert partitioner_of(partitioner.app) is partitioner


def test_partitioner_of_an_app_without_attach_names_the_fix() -> None:
    with pytest.raises(PartitionerError, match=r"partitioner.attach\(app\)"):
        partitioner_of(Celery("bare", set_as_current=False))


MASKED = [
    ("password", "redis://shop:s3cret@h:6379/0", "redis://shop:***@h:6379/0"),
    ("password only", "redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("no password", "redis://h:6379/0", "redis://h:6379/0"),
    ("amqp vhost", "amqp://guest:s3cret@h:5672//", "amqp://guest:***@h:5672//"),
    ("@ in password", "redis://u:s3c@ret@h/0", "redis://u:***@h/0"),
    ("unset", None, "(embedded server)"),
]


@pytest.mark.parametrize(
    ("url", "shown"), [case[1:] for case in MASKED], ids=[case[0] for case in MASKED]
)
def test_mask_url_hides_passwords(url: str | None, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.timeout(10)
def test_no_broker_refuses_to_publish_instead_of_guessing_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given no broker URL and no embedded server in the state folder
    settings = Settings(
        state_dir=tmp_path, partitions={"payment": PartitionSettings(tasks=["shop.payment.*"])}
    )
    app = attached(settings).app
    published = record_publishes(app, monkeypatch)

    # Then publishing names what to do, and Celery's amqp://localhost default is never used
    with pytest.raises(BrokerError, match=r"no embedded server runs in .*PARTITIONER_BROKER_URL"):
        app.send_task("shop.payment.charge")
    assert published == []

    # And once a server is recorded there (faked: discovery is the launcher's business),
    # the same app finds it on its next publish
    found = "redis://127.0.0.1:6390/0"
    monkeypatch.setattr("partitioner.embedded.discover", lambda state_dir: found)
    app.send_task("shop.payment.charge")
    assert app.conf.broker_url == found
    assert published == [("shop.payment.charge", "payment")]
