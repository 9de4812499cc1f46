"""Which event loop a process runs on."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect

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
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="uvloop is not installed"):
        loop.chosen()


def test_the_settings_a_process_read_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process passes the settings it read once; the environment is not read again."""
    from agentplex.runtime.settings import Settings

    monkeypatch.setenv("AGENTPLEX_EVENT_LOOP", "trio")  # would fail if read here
    settings = Settings.model_construct(event_loop="asyncio")
    assert loop.chosen(settings) == "asyncio"
    assert loop.run(_loop_module(), settings).startswith("asyncio")


def test_a_refused_loop_leaves_no_unawaited_coroutine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPLEX_EVENT_LOOP", "trio")
    coroutine = _loop_module()
    with pytest.raises(ValueError):
        loop.run(coroutine)
    # Closed, not left for the garbage collector to warn about.
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED
