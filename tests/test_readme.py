"""The README's settings reference lists every setting and its environment variable."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from partitioner.settings import Settings, env_name

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Settings reference"
NAME = "<name>"


Loc = tuple[str, ...]


def model_settings(model: type[BaseModel], prefix: Loc = ()) -> set[Loc]:
    """The location of every leaf setting; a table of models is written `<name>`."""
    found: set[Loc] = set()
    for field_name, info in model.model_fields.items():
        loc = (*prefix, field_name)
        annotation = info.annotation
        if typing.get_origin(annotation) is dict:
            annotation, loc = typing.get_args(annotation)[1], (*loc, NAME)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= model_settings(annotation, loc)
        else:
            found.add(loc)
    return found


def reference_rows() -> dict[str, list[str]]:
    """The rows of the README's settings table, by the setting in their first column."""
    text = README.read_text()
    assert HEADING in text, f"{README} has no '{HEADING}' section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows, f"the '{HEADING}' section of {README} has no table"

    header = [cell.strip().lower() for cell in rows[0].strip("|").split("|")]
    assert header == ["setting", "environment variable", "default", "meaning"]
    table: dict[str, list[str]] = {}
    for row in rows[2:]:  # after the header and its |---| line
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        table[unquote(cells[0])] = cells
    return table


def unquote(cell: str) -> str:
    quoted = re.fullmatch(r"`([^`]+)`", cell)
    return quoted.group(1) if quoted else cell


def test_reference_lists_every_setting_and_nothing_else() -> None:
    documented = set(reference_rows())

    expected = {".".join(loc) for loc in model_settings(Settings)}

    assert documented == expected, (
        f"undocumented: {sorted(expected - documented)}; "
        f"documented but not a setting: {sorted(documented - expected)}"
    )


def test_reference_names_each_environment_variable() -> None:
    rows = reference_rows()

    for loc in model_settings(Settings):
        setting = ".".join(loc)
        assert unquote(rows[setting][1]) == env_name(loc), setting


def test_settings_include_partition_limits() -> None:
    # Guards the walk above: if it stopped finding nested settings, this fails.
    assert {("budget",), ("partitions", NAME, "max")} <= model_settings(Settings)
