"""Which event loop a process runs on."""

from __future__ import annotations

import asyncio

import pytest

from agentplex.runtime import loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTPLEX_EVENT_LOOP", raising=False)
    assert loop.chosen() == "uvloop"
    assert loop.run(_loop_module()).startswith("uvloop")


def test_the_standard_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPLEX_EVENT_LOOP", "asyncio")
    assert loop.chosen() == "asyncio"
    assert loop.run(_loop_module()).startswith("asyncio")


def test_an_unknown_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPLEX_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="auto, uvloop or asyncio, not 'trio'"):
        loop.chosen()


def test_asking_for_uvloop_without_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPLEX_EVENT_LOOP", "uvloop")
    monkeypatch.setattr(loop.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="uvloop is not installed"):
        loop.chosen()
