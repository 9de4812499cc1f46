"""Renders every setting as Markdown: docs/SETTINGS.md is this module's output.

    python -m agentplex.runtime.settings_doc > docs/SETTINGS.md

One table per section of `Settings` (name, environment variable, default,
meaning), the meaning taken from each field's ``description``, so the
reference is written where the setting is declared and cannot drift from it
(tests/runtime/test_settings_doc.py compares the file with this output).
Defaults are the declared ones, never the current environment's.
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from agentplex.runtime.settings import (
    ENV_PREFIX,
    SECTIONS,
    Section,
    Settings,
    standard_variable,
)

COMMAND = "python -m agentplex.runtime.settings_doc > docs/SETTINGS.md"

HEADER = f"""\
# Settings

<!-- Generated from runtime/settings.py by `{COMMAND}`; edit the field descriptions there. -->

Every agentplex process reads its configuration once, at start, from environment
variables (prefix `AGENTPLEX_`, any case) into one typed `Settings` object
(`runtime/settings.py`); nothing else reads the environment. A value that does not
validate stops the process with a message naming the setting. `agentplex up`
passes its own environment on to every part it starts, so setting a variable
before `agentplex up` configures the whole mesh.
"""

_BOUNDS = {
    annotated_types.Gt: ">",
    annotated_types.Ge: "≥",
    annotated_types.Lt: "<",
    annotated_types.Le: "≤",
}


def render() -> str:
    """docs/SETTINGS.md, in full."""
    documented = [name for section in SECTIONS for name in section.model_fields]
    missing = set(Settings.model_fields) - set(documented)
    if missing:  # a field declared on Settings itself, outside every section
        raise ValueError(f"settings outside any section: {', '.join(sorted(missing))}")
    blocks = [HEADER] + [_section(section) for section in SECTIONS]
    return "\n".join(blocks)


def _section(section: type[Section]) -> str:
    title, _, intro = inspect.cleandoc(section.__doc__ or section.__name__).partition("\n")
    lines = [f"## {title.rstrip('.')}", ""]
    if intro.strip():
        lines += [" ".join(intro.split()), ""]
    lines += [
        "| Setting | Environment variable | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for name in section.model_fields:
        field = Settings.model_fields[name]
        if not field.description:
            raise ValueError(f"setting {name} has no description")
        meaning = " ".join([field.description, *_allowed(field)])
        row = [f"`{name}`", _env_names(name, field), _default(field), meaning]
        lines.append("| " + " | ".join(_cell(text) for text in row) + " |")
    return "\n".join(lines) + "\n"


def _env_names(name: str, field: FieldInfo) -> str:
    names = [ENV_PREFIX + name.upper()]
    standard = standard_variable(field)
    if standard is not None:
        names.append(standard)
    return ", ".join(f"`{n}`" for n in names)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        factory = field.default_factory
        return f"`{getattr(factory, '__qualname__', repr(factory))}()`"
    value: Any = field.default
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path | str):
        return f'`"{value}"`' if str(value) == "" else f"`{value}`"
    return f"`{value!r}`"


def _allowed(field: FieldInfo) -> list[str]:
    """What validation accepts beyond the type: the choices of a Literal, numeric bounds."""
    notes: list[str] = []
    if typing.get_origin(field.annotation) is Literal:
        choices = ", ".join(f"`{choice}`" for choice in typing.get_args(field.annotation))
        notes.append(f"One of {choices}.")
    bounds = [
        f"{symbol} {getattr(meta, kind.__name__.lower())}"
        for meta in field.metadata
        for kind, symbol in _BOUNDS.items()
        if isinstance(meta, kind)
    ]
    if bounds:
        notes.append(f"Must be {' and '.join(bounds)}.")
    return notes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
