"""Typed settings: TOML file, `.env` and `PARTITIONER_*` variables, validated up front.

Precedence, highest first: keyword arguments to `load_settings`, environment variables
(`PARTITIONER_*`, nested with `__`), the `.env` file, the TOML file named by `--config` or
`PARTITIONER_CONFIG`, then the defaults below. Every error names the setting and where its
value came from, so that a user knows which file or variable to edit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import (
    SettingsError as PydanticSettingsError,
)

from partitioner.errors import SettingsError

ENV_PREFIX = "PARTITIONER_"
CONFIG_ENV = "PARTITIONER_CONFIG"
# Set by `partitioner launch` for the worker processes it starts; not user settings.
INTERNAL_ENV = {"PARTITIONER_CONFIG", "PARTITIONER_WORKER", "PARTITIONER_TARGET"}
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp")
STATE_SCHEMES = ("redis", "rediss", "unix")
PartitionName = re.compile(r"^[a-z][a-z0-9_]*$")
Loc = tuple[str | int, ...]

_config_file: ContextVar[Path | None] = ContextVar("partitioner_config_file", default=None)


def _split_list(value: Any) -> Any:
    # Environment variables carry lists as "a,b" as readily as JSON.
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


Rate = Annotated[float, Field(gt=0, le=1)]


class BreakerSettings(BaseModel):
    """A partition's circuit breaker: when it opens, for how long, and what the gates do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Record outcomes and gate dispatch. Default true.")
    window: Literal["count", "time"] = Field(
        "count", description="Judge the last `window_calls` calls, or those of `window_s`."
    )
    window_calls: PositiveInt = Field(20, description="Calls in a count window. Default 20.")
    window_s: PositiveFloat = Field(30.0, description="Seconds of a time window. Default 30.")
    min_calls: PositiveInt = Field(
        10, description="Calls in the window before any decision. Default 10."
    )
    failure_rate: Rate = Field(0.5, description="Failure rate that opens it (0-1). 0.5.")
    slow_call_s: PositiveFloat | None = Field(
        None, description="A call running this many seconds is slow. Default: none is."
    )
    slow_call_rate: Rate = Field(0.8, description="Slow-call rate that opens it (0-1). 0.8.")
    open_s: PositiveFloat = Field(10.0, description="Seconds open before probing. Default 10.")
    open_backoff: float = Field(
        2.0, ge=1, description="Factor on open_s per consecutive re-open. Default 2."
    )
    open_max_s: PositiveFloat = Field(300.0, description="Cap of the open period. Default 300.")
    half_open_probes: PositiveInt = Field(
        3, description="Probe tasks admitted in half_open, across all hosts. Default 3."
    )
    record: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Dotted names of exceptions that count as failures. Default: all do.",
    )
    ignore: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Dotted names of exceptions that never count. Default: none.",
    )
    on_open: Literal["reject", "park"] = Field(
        "reject", description="What the producer gate does with a task while open."
    )
    on_store_error: Literal["allow", "halt"] = Field(
        "allow", description="What the gates do while the breaker store is unreachable."
    )
    replay_rate: PositiveFloat = Field(
        50.0, description="Parked tasks replayed per second after closing. Default 50."
    )

    _lists = field_validator("record", "ignore", mode="before")(_split_list)

    @model_validator(mode="after")
    def _consistent(self) -> BreakerSettings:
        if self.open_max_s < self.open_s:
            raise ValueError(f"open_max_s {self.open_max_s:g} is below open_s {self.open_s:g}")
        if self.window == "count" and self.min_calls > self.window_calls:
            raise ValueError(
                f"min_calls {self.min_calls} is above window_calls {self.window_calls}, so "
                "the breaker could never open; lower min_calls or raise window_calls"
            )
        return self


class PartitionSettings(BaseModel):
    """One partition: the tasks it owns, its queues, its limits and its pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Glob patterns of task names this partition owns, e.g. ['shop.payment.*'].",
    )
    queues: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Queues the partition's pool consumes; default: one named after the partition.",
    )
    min: NonNegativeInt = Field(
        1,
        description="Lowest concurrency of the partition; 0: it may stop fetching. Default 1.",
    )
    max: PositiveInt | None = Field(
        None, description="Highest concurrency the partition may have. Default: `concurrency`."
    )
    concurrency: NonNegativeInt | None = Field(
        None, description="Concurrency the pool starts with. Default: `min`."
    )
    prefetch: PositiveInt = Field(
        1, description="Messages each pool process reserves ahead (Celery prefetch multiplier)."
    )
    pool: Literal["prefork", "threads", "solo"] = Field(
        "prefork", description="Celery pool type of the partition's worker."
    )
    breaker: BreakerSettings = Field(
        BreakerSettings(), description="The partition's circuit breaker (a frozen model)."
    )

    _lists = field_validator("tasks", "queues", mode="before")(_split_list)

    @field_validator("tasks", "queues")
    @classmethod
    def _no_blank_names(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("names and patterns must not be blank")
        return value

    @property
    def initial(self) -> int:
        """The concurrency the pool starts with."""
        return self.concurrency if self.concurrency is not None else self.min

    @property
    def ceiling(self) -> int:
        """The highest concurrency the partition may reach."""
        return self.max if self.max is not None else max(self.initial, self.min)


class SupervisorSettings(BaseModel):
    """The control loop that moves capacity between partitions as their backlogs change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Resize pools by backlog; false keeps each at `concurrency`."
    )
    interval_s: PositiveFloat = Field(
        0.25, description="Seconds between two looks at backlogs and pools. Default 0.25."
    )
    cooldown_s: NonNegativeFloat = Field(
        10.0, description="Seconds a busy partition keeps a size before shrinking. Default 10."
    )
    lease_s: PositiveFloat = Field(
        3.0, description="Leader lease across hosts; a new leader within this. Default 3."
    )
    crash_loop_restarts: PositiveInt = Field(
        3, description="Quick restarts in a row that mark a partition degraded. Default 3."
    )

    @model_validator(mode="after")
    def _lease_outlives_steps(self) -> SupervisorSettings:
        # The lease and the heartbeats are renewed once a step: shorter, they would lapse
        # between two steps, and leadership would pass back and forth.
        if self.lease_s < 2 * self.interval_s:
            raise ValueError(
                f"lease_s {self.lease_s:g} is below twice interval_s {self.interval_s:g}; "
                "raise lease_s or lower interval_s"
            )
        return self


class Settings(BaseSettings):
    """All of Partitioner's settings. See `config/partitioner.toml` for a worked example."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",
        frozen=True,
    )

    broker_url: str | None = Field(
        None,
        description="Broker URL (redis://, rediss://, amqp://). Unset: the embedded server.",
    )
    name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of this application; namespaces its breaker keys in Redis.",
    )
    state_url: str | None = Field(
        None,
        description="Redis URL of the breakers' shared state. Default: the broker, if Redis.",
    )
    budget: PositiveInt | None = Field(
        None,
        description="Total concurrency all partitions on a host may use. Default: sum of max.",
    )
    cluster_budget: PositiveInt | None = Field(
        None,
        description="Total concurrency of all hosts on this broker together. Default: no cap.",
    )
    supervisor: SupervisorSettings = Field(
        SupervisorSettings(), description="The supervisor's timing (a frozen model)."
    )
    state_dir: Path = Field(
        Path(".partitioner"),
        description="Folder for the embedded server's files and the launcher's state.",
    )
    shutdown_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a warm shutdown waits for running tasks before a cold one. 60.",
    )
    partitions: dict[str, PartitionSettings] = Field(
        default_factory=dict, description="The partitions, by name."
    )

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str | None) -> str | None:
        return _url_with_scheme(value, BROKER_SCHEMES)

    @field_validator("state_url")
    @classmethod
    def _state_scheme(cls, value: str | None) -> str | None:
        return _url_with_scheme(value, STATE_SCHEMES)

    @field_validator("partitions")
    @classmethod
    def _partition_names(cls, value: dict[str, PartitionSettings]) -> dict[str, PartitionSettings]:
        for name in value:
            if not PartitionName.match(name):
                # A custom error carries the name, so that the message points at the one
                # partition (and its source) rather than at the whole `partitions` table.
                raise PydanticCustomError(
                    "partition_name",
                    "partition name '{name}' must be lowercase letters, digits and '_', "
                    "starting with a letter (it is also an environment variable part)",
                    {"name": name},
                )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file.get())
        return init_settings, env_settings, dotenv_settings, toml


def _url_with_scheme(value: str | None, schemes: tuple[str, ...]) -> str | None:
    if not value:
        return None
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        known = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"unsupported scheme {scheme or '(none)'!r}; use one of {known}")
    return value


def mask_url(url: str | None) -> str:
    """The URL with every password replaced by `***`, fit for logs and output.

    Handles kombu's failover lists (`url1;url2`) and a `password=` query parameter.
    """
    if not url:
        return "(embedded server)"
    return ";".join(_mask_one(part) for part in url.split(";"))


def _mask_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(query=query))


class Origins:
    """Where each setting's value came from, to name it in error messages."""

    def __init__(self, layers: list[tuple[str, Mapping[str, Any]]]) -> None:
        self._layers = layers

    def of(self, loc: Loc) -> str:
        """A phrase like 'from environment variable PARTITIONER_BUDGET' for a setting."""
        for label, data in self._layers:
            value = _lookup(data, loc)
            if value is not _MISSING:
                if label in ("environment", ".env"):
                    where = "environment variable" if label == "environment" else ".env entry"
                    # A table (a partition) is named by the prefix its variables share.
                    suffix = "__*" if isinstance(value, Mapping) else ""
                    return f"from {where} {env_name(loc)}{suffix}"
                return f"from {label}"
        # An unset value is a default, but the user needs to know which file or variable
        # declared the table it belongs to (a partition with no tasks, say).
        if len(loc) > 1:
            return f"default; {setting_name(loc[:-1])} {self.of(loc[:-1])}"
        files = [label for label, _ in self._layers if label.startswith("config file")]
        return f"default; not set in {files[0]}" if files else "default"


def env_name(loc: Loc) -> str:
    """The environment variable that sets the setting at `loc`."""
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def setting_name(loc: Loc) -> str:
    """The dotted name of a setting, as in the TOML file: `partitions.payment.max`."""
    return ".".join(str(part) for part in loc) or "(settings)"


_MISSING = object()


def _lookup(data: Mapping[str, Any], loc: Loc) -> Any:
    node: Any = data
    for part in loc:
        if isinstance(node, Mapping) and str(part).lower() in {str(k).lower() for k in node}:
            node = next(v for k, v in node.items() if str(k).lower() == str(part).lower())
        else:
            return _MISSING
    return node


@contextmanager
def _using_config(path: Path | None) -> Iterator[None]:
    token = _config_file.set(path)
    try:
        yield
    finally:
        _config_file.reset(token)


def config_path(config: str | os.PathLike[str] | None = None) -> Path | None:
    """The TOML file to read: the explicit one, else `PARTITIONER_CONFIG`, else none."""
    chosen = config if config is not None else os.environ.get(CONFIG_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    where = "--config" if config is not None else f"environment variable {CONFIG_ENV}"
    if not path.is_file():
        raise SettingsError([f"config file {str(path)!r} ({where}) does not exist"])
    return path.resolve()


def load_settings(
    config: str | os.PathLike[str] | None = None,
    env_file: str | Path | None = ".env",
    **overrides: Any,
) -> tuple[Settings, Origins]:
    """Read and validate the settings, with the origin of every value.

    Raises `SettingsError` naming each bad setting and where its value came from.
    """
    path = config_path(config)
    _reject_unknown_variables()

    with _using_config(path):
        origins = _origins(path, env_file, overrides)
        try:
            settings = Settings(_env_file=env_file, **overrides)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, origins)) from None
        except PydanticSettingsError as exc:
            raise SettingsError([f"{exc} (check PARTITIONER_* variables and .env)"]) from None
        except (OSError, ValueError) as exc:
            raise SettingsError([f"config file {str(path)!r} cannot be read: {exc}"]) from None
    return settings, origins


def _origins(path: Path | None, env_file: Any, overrides: Mapping[str, Any]) -> Origins:
    layers: list[tuple[str, Mapping[str, Any]]] = [("keyword argument", overrides)]
    try:
        layers.append(("environment", EnvSettingsSource(Settings)()))
        layers.append((".env", DotEnvSettingsSource(Settings, env_file=env_file)()))
    except PydanticSettingsError:
        pass  # the same error is reported when the settings themselves are built
    if path is not None:
        with suppress(ValueError):
            layers.append((f"config file {path}", TomlConfigSettingsSource(Settings, path)()))
    return Origins(layers)


def _reject_unknown_variables() -> None:
    # pydantic-settings ignores environment variables that match no field, so a typo like
    # PARTITIONER_BUGDET would silently do nothing.
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | INTERNAL_ENV
    unknown = sorted(
        name
        for name in os.environ
        if name.startswith(ENV_PREFIX) and name.split("__")[0] not in known
    )
    if unknown:
        names = ", ".join(sorted(known - INTERNAL_ENV))
        raise SettingsError(
            [f"unknown setting {name} (environment); known settings: {names}" for name in unknown]
        )


def _describe(exc: ValidationError, origins: Origins) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        message = error["msg"]
        value = error.get("input")
        where = origins.of(loc)
        if error["type"] == "partition_name":
            loc = (*loc, error["ctx"]["name"])
            where = origins.of(loc)
        elif error["type"] == "extra_forbidden" and where.startswith("from .env"):
            # pydantic-settings names an unknown .env entry by its whole name, prefix included.
            loc = (str(loc[0]).removeprefix(ENV_PREFIX.lower()), *loc[1:])
            where = f"from .env entry {env_name(loc)}"
        if error["type"] == "extra_forbidden":
            message = "unknown setting; check its spelling against the settings reference"
        elif error["type"] == "missing":
            message = "is required"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if loc[:1] in (("broker_url",), ("state_url",)) and isinstance(value, str):
            value = mask_url(value)
        # A whole table (a rule across its fields) is named, not printed.
        quiet = isinstance(value, dict) or error["type"] in (
            "missing",
            "extra_forbidden",
            "partition_name",
        )
        shown = "" if quiet else f" = {value!r}"
        problems.append(f"{setting_name(loc)}{shown} ({where}): {message}")
    return problems
