"""Live limits: a changed file is validated, limits apply, other changes are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from partitioner.errors import SettingsError
from partitioner.settings import load_settings
from partitioner.supervisor.live import reload

pytestmark = pytest.mark.usefixtures("hermetic")

BASE = """
budget = 4
[partitions.mail]
tasks = ["shop.mail.*"]
min = 0
max = 2
[partitions.pay]
tasks = ["shop.pay.*"]
max = 2
"""


def written(folder: Path, text: str) -> Path:
    path = folder / "partitioner.toml"
    path.write_text(text)
    return path


def test_new_limits_apply_and_say_what_changed(hermetic: Path) -> None:
    path = written(hermetic, BASE)
    running, _ = load_settings(path)
    written(hermetic, BASE.replace("budget = 4", "budget = 6").replace("max = 2\n[", "max = 4\n["))

    settings, topology, changed = reload(running, path)

    assert settings.budget == 6
    assert topology.by_name["mail"].max == 4
    assert changed == ["budget 4 -> 6", "partitions.mail.max 2 -> 4"]


def test_an_unchanged_file_changes_nothing(hermetic: Path) -> None:
    path = written(hermetic, BASE)
    running, _ = load_settings(path)
    assert reload(running, path)[2] == []


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (("max = 2\n[", "max = 0\n["), "partitions.mail.max = 0"),
        (("min = 0", "min = 3"), "min 3 is above max 2"),
        (('"shop.pay.*"', '"shop.money.*"'), "partitions.pay.tasks changed; it takes effect"),
        (("budget = 4", 'budget = 4\nname = "other"'), "name changed; it takes effect only"),
        (("[partitions.pay]", "[partitions.pay.breaker]\nopen_s = 1\n[partitions.pay]"),
         "partitions.pay.breaker.open_s changed"),
    ],
)  # fmt: skip
def test_a_bad_edit_is_refused_naming_the_problem(
    hermetic: Path, edit: tuple[str, str], says: str
) -> None:
    path = written(hermetic, BASE)
    running, _ = load_settings(path)
    written(hermetic, BASE.replace(*edit))

    with pytest.raises(SettingsError) as refused:
        reload(running, path)

    assert any(says in problem for problem in refused.value.problems), refused.value.problems
