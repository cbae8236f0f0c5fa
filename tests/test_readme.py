"""The README is the contract with a newcomer: its settings table and commands must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from deepvit.service.config import Settings

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme_table() -> None:
    documented = set(re.findall(r"^\| `(DEEPVIT_[A-Z0-9_]+)` \|", README, flags=re.M))
    expected = {f"DEEPVIT_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from the README"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_the_readme_names_the_two_commands_and_the_makefile_has_them() -> None:
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    for target in ("serve", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
