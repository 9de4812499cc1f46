"""docs/SETTINGS.md is generated from the settings' descriptions and must not drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentplex.runtime import settings_doc
from agentplex.runtime.settings import SECTIONS, Settings

SETTINGS_MD = Path(__file__).resolve().parents[2] / "docs" / "SETTINGS.md"


def test_docs_settings_md_is_what_the_generator_writes() -> None:
    assert SETTINGS_MD.read_text() == settings_doc.render(), (
        f"docs/SETTINGS.md is stale; regenerate it: {settings_doc.COMMAND}"
    )


def test_every_setting_is_in_one_section_and_described() -> None:
    names = [name for section in SECTIONS for name in section.model_fields]
    assert sorted(names) == sorted(Settings.model_fields)
    assert all(Settings.model_fields[name].description for name in names)


def test_every_setting_has_a_row_with_its_variable() -> None:
    text = settings_doc.render()
    for name in Settings.model_fields:
        assert f"| `{name}` | `AGENTPLEX_{name.upper()}`" in text


def test_defaults_are_the_declared_ones_not_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = settings_doc.render()
    monkeypatch.setenv("AGENTPLEX_KEY_PREFIX", "from-the-environment")
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:1/0")
    assert settings_doc.render() == before


def test_choices_and_bounds_come_from_the_types() -> None:
    text = settings_doc.render()
    assert "One of `auto`, `uvloop`, `asyncio`." in text
    assert "Must be ≥ 0 and ≤ 1." in text  # task_event_linger_seconds
    assert "| `docs_dir` | `AGENTPLEX_DOCS_DIR` | unset |" in text
    assert "| `external_redis_url` | `AGENTPLEX_EXTERNAL_REDIS_URL`, `REDIS_URL` | unset |" in text
