"""Settings: sources, their precedence, and errors naming the setting and its source."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from partitioner.errors import SettingsError
from partitioner.settings import load_settings
from partitioner.topology import Topology
from tests.cases import CONFIG_NAME, ORDER, PAYMENT, BadCase, bad_cases

pytestmark = pytest.mark.usefixtures("hermetic")

PROJECT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "partitioner.toml"


def validate(config: Path | None) -> Topology:
    """What `partitioner check` does: load the settings, then build the topology."""
    settings, origins = load_settings(config)
    return Topology.from_settings(settings, origins)


def write_config(folder: Path, text: str) -> Path:
    path = folder / CONFIG_NAME
    path.write_text(text)
    return path


@bad_cases
def test_bad_settings_are_refused_naming_setting_and_source(
    case: BadCase, hermetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the case's files and variables
    config = case.write(hermetic)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)

    # When they are validated
    with pytest.raises(SettingsError) as raised:
        validate(config)

    # Then one problem line names the setting, its source and what is wrong
    setting, source = case.expected(hermetic)
    problems = raised.value.problems
    named = [p for p in problems if setting in p and source in p and case.says in p]
    assert named, problems
    if case.secret:
        assert case.secret not in str(raised.value)


IN_ENV = "from environment variable PARTITIONER_BUDGET"
PRECEDENCE = [
    ("defaults only", (), None, "default"),
    ("TOML over defaults", ("toml",), 2, "from config file"),
    (".env over TOML", ("toml", "dotenv"), 3, "from .env entry PARTITIONER_BUDGET"),
    ("environment over .env", ("toml", "dotenv", "env"), 4, IN_ENV),
    ("environment over TOML", ("toml", "env"), 4, IN_ENV),
    ("keyword over all", ("toml", "dotenv", "env", "init"), 5, "from keyword argument"),
]


@pytest.mark.parametrize(
    ("layers", "budget", "origin"),
    [case[1:] for case in PRECEDENCE],
    ids=[case[0] for case in PRECEDENCE],
)
def test_precedence_is_init_env_dotenv_toml_defaults(
    layers: tuple[str, ...],
    budget: int | None,
    origin: str,
    hermetic: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given budget set to a different value in each layer present
    config = write_config(hermetic, "budget = 2\n") if "toml" in layers else None
    if "dotenv" in layers:
        (hermetic / ".env").write_text("PARTITIONER_BUDGET=3\n")
    if "env" in layers:
        monkeypatch.setenv("PARTITIONER_BUDGET", "4")
    overrides: dict[str, Any] = {"budget": 5} if "init" in layers else {}

    # When the settings are loaded
    settings, origins = load_settings(config, **overrides)

    # Then the highest layer wins, and the origin says which one it was
    assert settings.budget == budget
    assert origins.of(("budget",)).startswith(origin)


def test_nested_env_overrides_one_field_of_a_toml_partition(
    hermetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(hermetic, PAYMENT + "max = 2\n")
    monkeypatch.setenv("PARTITIONER_PARTITIONS__PAYMENT__MAX", "3")

    settings, origins = load_settings(config)

    payment = settings.partitions["payment"]
    assert (payment.max, payment.tasks) == (3, ["shop.payment.*"])
    assert origins.of(("partitions", "payment", "max")) == (
        "from environment variable PARTITIONER_PARTITIONS__PAYMENT__MAX"
    )
    assert origins.of(("partitions", "payment", "tasks")).endswith(str(config))


def test_env_alone_can_declare_a_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTITIONER_PARTITIONS__PAYMENT__TASKS", "shop.payment.*")
    monkeypatch.setenv("PARTITIONER_PARTITIONS__PAYMENT__MAX", "2")

    topology = validate(None)

    assert topology.route("shop.payment.charge").partition.max == 2


LIST_FORMS: dict[str, Callable[[list[str]], str]] = {
    "comma separated": ",".join,
    "comma and spaces": ", ".join,
    "JSON list": json.dumps,
}


@pytest.mark.parametrize("form", LIST_FORMS.values(), ids=LIST_FORMS.keys())
def test_list_values_from_env(
    form: Callable[[list[str]], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks, queues = ["shop.payment.*", "shop.refund.*"], ["payment", "payment_slow"]
    monkeypatch.setenv("PARTITIONER_PARTITIONS__PAYMENT__TASKS", form(tasks))
    monkeypatch.setenv("PARTITIONER_PARTITIONS__PAYMENT__QUEUES", form(queues))

    settings, _ = load_settings()

    assert settings.partitions["payment"].tasks == tasks
    assert settings.partitions["payment"].queues == queues


GOOD = [
    ("min = concurrency = max", PAYMENT + "min = 2\nconcurrency = 2\nmax = 2\n"),
    ("sums of min and concurrency equal budget", "budget = 2\n" + PAYMENT + ORDER),
    ("default partition without tasks", PAYMENT + "[partitions.default]\n"),
    ("solo pool with max 1", PAYMENT + 'pool = "solo"\nmax = 1\n'),
    ("threads pool", PAYMENT + 'pool = "threads"\nmax = 8\n'),
    ("redis URL with password", 'broker_url = "redis://:pw@127.0.0.1/0"\n' + PAYMENT),
    ("amqp URL", 'broker_url = "amqp://guest:guest@127.0.0.1:5672//"\n' + PAYMENT),
]


@pytest.mark.parametrize("toml", [case[1] for case in GOOD], ids=[case[0] for case in GOOD])
def test_settings_at_the_edges_are_accepted(toml: str, hermetic: Path) -> None:
    topology = validate(write_config(hermetic, toml))

    assert all(p.min <= p.concurrency <= p.max for p in topology.partitions)
    assert sum(p.concurrency for p in topology.partitions) <= topology.budget


def test_budget_defaults_to_the_sum_of_max(hermetic: Path) -> None:
    config = write_config(hermetic, PAYMENT + "max = 2\n" + ORDER + "max = 3\n")

    assert validate(config).budget == 5


def test_config_file_from_partitioner_config(
    hermetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(hermetic, "budget = 7\n" + PAYMENT)
    monkeypatch.setenv("PARTITIONER_CONFIG", CONFIG_NAME)

    settings, origins = load_settings()

    assert settings.budget == 7
    config = hermetic.resolve() / CONFIG_NAME
    assert origins.of(("budget",)) == f"from config file {config}"


def test_variables_set_by_the_launcher_are_not_unknown_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PARTITIONER_WORKER", "payment@host")
    monkeypatch.setenv("PARTITIONER_PARTITIONS__PAYMENT__TASKS", "shop.payment.*")

    assert validate(None).by_name["payment"].patterns == ("shop.payment.*",)


def test_the_project_config_is_valid() -> None:
    topology = validate(PROJECT_CONFIG)

    assert [p.name for p in topology.partitions] == [
        "order",
        "payment",
        "inventory",
        "notification",
    ]
    assert topology.budget == 4
    assert topology.route("shop.payment.charge").queue == "payment"


def test_every_problem_is_reported_at_once(hermetic: Path) -> None:
    config = write_config(hermetic, "bogus = 1\n" + PAYMENT + "max = 0\n")

    with pytest.raises(SettingsError) as raised:
        validate(config)

    assert len(raised.value.problems) == 2
    assert "(2 problems)" in str(raised.value)
