"""The command line every scenario shares: its parser, its table of options, and the
checks more than one scenario makes of them."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Sequence

# One option of a scenario: its flag, type, default and help text.
Option = tuple[str, type, object, str]


def parser(
    scenario: str, doc: str | None, epilog: str, options: Sequence[Option]
) -> argparse.ArgumentParser:
    """The parser of `python -m bench.<scenario>`, each option's default in its help."""
    found = argparse.ArgumentParser(
        prog=f"python -m bench.{scenario}",
        description=doc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = found.add_argument
    for flag, kind, default, text in options:
        add(flag, type=kind, default=default, help=f"{text} (%(default)s)")
    return found


def chosen(
    found: argparse.ArgumentParser,
    flag: str,
    value: str,
    known: Collection[str],
    use: str,
) -> list[str]:
    """The names of a comma-separated option; exits naming any unknown, and `use`."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        found.error(f"{flag}: unknown {unknown}; use {use}")
    return names


def require_redis(found: argparse.ArgumentParser, url: str, why: str) -> None:
    """Exit unless `--broker` is a Redis URL; `why` says what needs Redis."""
    if not url.startswith(("redis://", "rediss://")):
        found.error(f"--broker must be a redis:// URL: {why}")
