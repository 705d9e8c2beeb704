"""Bad settings, one per case, for the settings tests and the `partitioner check` tests.

Each case says where its values live (TOML file, environment, `.env`) and what the error
must name: the setting, and the file or variable it came from. `{config}` in an
expectation stands for the resolved path of the case's TOML file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CONFIG_NAME = "partitioner.toml"
IN_CONFIG = "from config file {config}"

PAYMENT = '[partitions.payment]\ntasks = ["shop.payment.*"]\n'
ORDER = '[partitions.order]\ntasks = ["shop.order.*"]\n'
SHOP_STAR = '[partitions.{name}]\ntasks = ["shop.*"]\n'


@dataclass(frozen=True)
class BadCase:
    """Settings that must be refused, and what the refusal must name."""

    id: str
    setting: str
    source: str = IN_CONFIG
    says: str = ""
    toml: str | None = PAYMENT
    env: Mapping[str, str] = field(default_factory=dict)
    dotenv: str | None = None
    config: str | None = CONFIG_NAME
    secret: str | None = None

    def write(self, folder: Path) -> Path | None:
        """Write the case's files into `folder`; return the config file to name."""
        if self.toml is not None:
            (folder / CONFIG_NAME).write_text(self.toml)
        if self.dotenv is not None:
            (folder / ".env").write_text(self.dotenv)
        return folder / self.config if self.config else None

    def expected(self, folder: Path) -> tuple[str, str]:
        """The setting and the source the error must name, with `{config}` filled in."""
        config = str((folder / CONFIG_NAME).resolve())
        return self.setting.format(config=config), self.source.format(config=config)


BAD_CASES = [
    BadCase(
        "unknown top-level key in TOML",
        setting="bogus",
        says="unknown setting",
        toml="bogus = 1\n" + PAYMENT,
    ),
    BadCase(
        "unknown key in a TOML partition",
        setting="partitions.payment.colour",
        says="unknown setting",
        toml=PAYMENT + 'colour = "red"\n',
    ),
    BadCase(
        "unknown PARTITIONER_ variable",
        setting="PARTITIONER_BUGDET",
        source="(environment)",
        says="unknown setting",
        env={"PARTITIONER_BUGDET": "4"},
    ),
    BadCase(
        "unknown nested PARTITIONER_ variable",
        setting="partitions.payment.colour",
        source="from environment variable PARTITIONER_PARTITIONS__PAYMENT__COLOUR",
        says="unknown setting",
        env={"PARTITIONER_PARTITIONS__PAYMENT__COLOUR": "red"},
    ),
    BadCase(
        "unknown .env entry",
        setting="bugdet",
        source="from .env entry PARTITIONER_BUGDET",
        says="unknown setting",
        dotenv="PARTITIONER_BUGDET=4\n",
    ),
    BadCase(
        "min above max",
        setting="partitions.payment.min",
        says="min 3 is above max 2",
        toml=PAYMENT + "min = 3\nmax = 2\nconcurrency = 2\n",
    ),
    BadCase(
        "concurrency above max",
        setting="partitions.payment.concurrency",
        says="outside its limits min 1..max 2",
        toml=PAYMENT + "max = 2\nconcurrency = 3\n",
    ),
    BadCase(
        "concurrency below min from env",
        setting="partitions.payment.concurrency",
        source="from environment variable PARTITIONER_PARTITIONS__PAYMENT__CONCURRENCY",
        says="outside its limits min 2..max 3",
        toml=PAYMENT + "min = 2\nmax = 3\n",
        env={"PARTITIONER_PARTITIONS__PAYMENT__CONCURRENCY": "1"},
    ),
    BadCase(
        "sum of min above budget",
        setting="budget",
        says="min add up to 4, more than the budget 3",
        toml="budget = 3\n" + PAYMENT + "min = 2\n" + ORDER + "min = 2\n",
    ),
    BadCase(
        "sum of concurrency above budget",
        setting="budget",
        says="concurrency adds up to 4, more than the budget 3",
        toml="budget = 3\n"
        + (PAYMENT + "concurrency = 2\nmax = 2\n")
        + (ORDER + "concurrency = 2\nmax = 2\n"),
    ),
    BadCase(
        "budget from env overrides a valid TOML budget",
        setting="budget",
        source="from environment variable PARTITIONER_BUDGET",
        says="more than the budget 1",
        toml="budget = 2\n" + PAYMENT + ORDER,
        env={"PARTITIONER_BUDGET": "1"},
    ),
    BadCase(
        "task pattern claimed by two partitions",
        setting="partitions.order.tasks",
        says="'shop.*' is claimed by partitions 'payment' and 'order'",
        toml=SHOP_STAR.format(name="payment") + SHOP_STAR.format(name="order"),
    ),
    BadCase(
        "queue shared by two partitions",
        setting="partitions.order.queues",
        says="queue 'shared' is used by partitions 'payment' and 'order'",
        toml=PAYMENT + 'queues = ["shared"]\n' + ORDER + 'queues = ["shared"]\n',
    ),
    BadCase(
        "http broker URL with a password",
        setting="broker_url",
        says="unsupported scheme 'http'",
        toml='broker_url = "http://shop:s3cret@example.com/0"\n' + PAYMENT,
        secret="s3cret",
    ),
    BadCase(
        "broker URL without scheme from env",
        setting="broker_url",
        source="from environment variable PARTITIONER_BROKER_URL",
        says="unsupported scheme '(none)'",
        env={"PARTITIONER_BROKER_URL": "127.0.0.1:6379"},
    ),
    BadCase(
        "zero max",
        setting="partitions.payment.max",
        says="greater than 0",
        toml=PAYMENT + "max = 0\n",
    ),
    BadCase(
        "negative min from env",
        setting="partitions.payment.min",
        source="from environment variable PARTITIONER_PARTITIONS__PAYMENT__MIN",
        says="greater than or equal to 0",
        env={"PARTITIONER_PARTITIONS__PAYMENT__MIN": "-1"},
    ),
    BadCase(
        "zero max from .env",
        setting="partitions.payment.max",
        source="from .env entry PARTITIONER_PARTITIONS__PAYMENT__MAX",
        says="greater than 0",
        dotenv="PARTITIONER_PARTITIONS__PAYMENT__MAX=0\n",
    ),
    BadCase(
        "cluster budget below the mins",
        setting="cluster_budget",
        source="from environment variable PARTITIONER_CLUSTER_BUDGET",
        says="min add up to 2, more than the cluster budget 1",
        toml=PAYMENT + ORDER,
        env={"PARTITIONER_CLUSTER_BUDGET": "1"},
    ),
    BadCase(
        "supervisor interval of zero",
        setting="supervisor.interval_s",
        source="from environment variable PARTITIONER_SUPERVISOR__INTERVAL_S",
        says="greater than 0",
        env={"PARTITIONER_SUPERVISOR__INTERVAL_S": "0"},
    ),
    BadCase(
        "zero budget from env",
        setting="budget",
        source="from environment variable PARTITIONER_BUDGET",
        says="greater than 0",
        env={"PARTITIONER_BUDGET": "0"},
    ),
    BadCase(
        "negative prefetch",
        setting="partitions.payment.prefetch",
        says="greater than 0",
        toml=PAYMENT + "prefetch = -1\n",
    ),
    BadCase(
        "zero shutdown timeout",
        setting="shutdown_timeout_s",
        says="greater than 0",
        toml="shutdown_timeout_s = 0\n" + PAYMENT,
    ),
    BadCase(
        "max not a number from env",
        setting="partitions.payment.max",
        source="from environment variable PARTITIONER_PARTITIONS__PAYMENT__MAX",
        says="valid integer",
        env={"PARTITIONER_PARTITIONS__PAYMENT__MAX": "two"},
    ),
    BadCase(
        "unknown pool type",
        setting="partitions.payment.pool",
        says="'prefork', 'threads' or 'solo'",
        toml=PAYMENT + 'pool = "gevent"\n',
    ),
    BadCase(
        "solo pool with max above 1",
        setting="partitions.payment.max",
        says="a solo pool runs one task at a time",
        toml=PAYMENT + 'pool = "solo"\nmax = 2\n',
    ),
    BadCase(
        "blank task pattern",
        setting="partitions.payment.tasks",
        says="must not be blank",
        toml='[partitions.payment]\ntasks = ["shop.payment.*", " "]\n',
    ),
    BadCase(
        "task list from env that is broken JSON",
        setting="partitions.payment.tasks",
        source="from environment variable PARTITIONER_PARTITIONS__PAYMENT__TASKS",
        says="Expecting value",
        env={"PARTITIONER_PARTITIONS__PAYMENT__TASKS": '["shop.payment.*", '},
    ),
    BadCase(
        "uppercase partition name in TOML",
        setting="partitions.Payment",
        says="must be lowercase letters",
        toml='[partitions.Payment]\ntasks = ["shop.payment.*"]\n',
    ),
    BadCase(
        "partition name starting with a digit from env",
        setting="partitions.9lives",
        source="from environment variable PARTITIONER_PARTITIONS__9LIVES__*",
        says="starting with a letter",
        env={"PARTITIONER_PARTITIONS__9LIVES__TASKS": "cat.*"},
    ),
    BadCase(
        "missing config file named by --config",
        setting="missing.toml",
        source="(--config)",
        says="does not exist",
        toml=None,
        config="missing.toml",
    ),
    BadCase(
        "missing config file named by PARTITIONER_CONFIG",
        setting="missing.toml",
        source="environment variable PARTITIONER_CONFIG",
        says="does not exist",
        toml=None,
        config=None,
        env={"PARTITIONER_CONFIG": "missing.toml"},
    ),
    BadCase(
        "unparsable TOML",
        setting="config file '{config}'",
        source="config file '{config}'",
        says="cannot be read",
        toml="budget = [\n",
    ),
    BadCase(
        "no partitions in the TOML file",
        setting="partitions",
        source="not set in config file {config}",
        says="no partitions are declared",
        toml="budget = 2\n",
    ),
    BadCase(
        "no partitions anywhere",
        setting="partitions",
        source="(default)",
        says="no partitions are declared",
        toml=None,
        config=None,
    ),
    BadCase(
        "non-default partition without tasks in TOML",
        setting="partitions.order.tasks",
        source="partitions.order from config file {config}",
        says="is empty",
        toml=PAYMENT + "[partitions.order]\nmax = 1\n",
    ),
    BadCase(
        "non-default partition without tasks from env",
        setting="partitions.order.tasks",
        source="from environment variable PARTITIONER_PARTITIONS__ORDER__*",
        says="is empty",
        env={"PARTITIONER_PARTITIONS__ORDER__MAX": "1"},
    ),
]

bad_cases = pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
