"""The `local` model for real: llama.cpp's server with SmolLM2-135M-Instruct, offline.

A real streamed answer through the `openai` provider, a real summary written into
Memory by the context manager, and `agentplex up --llm local` end to end. Small
`max_tokens` keep each model call to a second or two on two cores. CI installs the
`local` extra, so there these tests run; elsewhere they skip only if it is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agentplex.agents.context import ContextManager, ContextPolicy
from agentplex.agents.llm.base import ChatMessage, Completion, CompletionRequest, TextDelta
from agentplex.agents.llm.openai import OpenAIProvider
from agentplex.clients.memory import MemoryClient
from agentplex.memory import app as memory_app
from agentplex.mesh.local_model import (
    MODEL_ALIAS,
    LocalModelServer,
    find_gguf,
    missing_packages,
)
from agentplex.runtime.clients import Deadline
from agentplex.runtime.settings import Settings
from agentplex.v1 import memory_pb2

pytestmark = pytest.mark.slow

_MISSING = missing_packages()
if _MISSING:
    reason = f"the local extra is not installed ({', '.join(_MISSING)}): pip install -e '.[local]'"
    if os.environ.get("CI"):
        # CI installs the extra; a skip there would hide that the real model never ran.
        pytest.fail(f"{reason} — CI must install it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = f"openai/{MODEL_ALIAS}"
RUN_FLAGS = ("--token-budget", "2048", "Say hello in five words.")


@pytest.fixture
async def local_model(tmp_path: Path) -> AsyncIterator[LocalModelServer]:
    async with LocalModelServer(log_path=tmp_path / "llm.log") as server:
        yield server


@pytest.fixture
async def provider(local_model: LocalModelServer) -> AsyncIterator[OpenAIProvider]:
    llm = OpenAIProvider(
        base_url=local_model.base_url, api_key="", model=MODEL_ALIAS, timeout_seconds=60
    )
    try:
        yield llm
    finally:
        await llm.aclose()


def test_the_gguf_ships_inside_the_wheel() -> None:
    gguf = find_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000


async def test_a_real_streamed_answer(provider: OpenAIProvider) -> None:
    request = CompletionRequest(
        messages=(
            ChatMessage("system", "Answer in one short sentence."),
            ChatMessage("user", "What is the capital of France?"),
        ),
        max_tokens=24,
    )
    deltas: list[str] = []
    completion = None
    async for event in provider.stream(request):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            completion = event
    assert isinstance(completion, Completion)
    assert len(deltas) > 1, "the answer should arrive token by token"
    assert "".join(deltas) == completion.content and completion.content.strip()
    assert completion.finish_reason in {"stop", "length"}
    assert completion.model == MODEL
    assert 0 < completion.usage.completion_tokens


async def test_a_real_summary_is_stored_in_memory(
    provider: OpenAIProvider, settings: Settings
) -> None:
    host = memory_app.build_host(settings, metrics_port=None)
    memory = MemoryClient((await host.start()).address)
    try:
        facts = [
            ("My name is Ada and I run the deploys.", "Nice to meet you, Ada."),
            ("The deploy is on Friday at noon.", "Friday at noon, noted."),
            ("The door code is 4512.", "I will remember 4512."),
            ("Our database is Postgres 16.", "Postgres 16, understood."),
            ("Bob reviews every change.", "Bob reviews changes."),
            ("What should I prepare?", "Prepare the release notes."),
        ]
        for question, answer in facts:
            await memory.append(
                "assistant",
                "s-local",
                [
                    memory_pb2.MemoryMessage(role=memory_pb2.ROLE_USER, content=question),
                    memory_pb2.MemoryMessage(role=memory_pb2.ROLE_ASSISTANT, content=answer),
                ],
                timeout=5,
            )
        # 12 short messages against a limit of 8: the oldest must be summarized.
        policy = ContextPolicy(max_tokens=400, max_messages=8, summary_tokens=48)
        context = await ContextManager(memory=memory, llm=provider, policy=policy).load(
            "assistant", "s-local", Deadline.after(120)
        )

        assert len(context.summary_calls) == 1
        assert context.summary is not None and context.summary.content.strip()
        assert 0 < context.summary.token_count <= 48
        stored = await memory.load("assistant", "s-local", 400, timeout=5)
        assert stored.summary.content == context.summary.content
        assert stored.summary.model == MODEL
        assert stored.summary.through_position == 8
        assert len(stored.messages) == 4 and context.token_count <= 400
    finally:
        await memory.close()
        await host.stop()


def test_agentplex_up_with_the_local_model_streams_a_real_answer(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["AGENTPLEX_DOCS_DIR"] = str(REPO_ROOT)
    state_file = tmp_path / "mesh.json"
    cli = [sys.executable, "-m", "agentplex.mesh", "--state-file", str(state_file)]
    up = subprocess.Popen(
        # Security is not what this tests: plaintext, no tokens.
        [*cli, "up", "--ephemeral-ports", "--llm", "local", "--no-auth", "--no-mtls"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert up.stdout is not None
    try:
        give_up = time.monotonic() + 180
        while not state_file.exists() and up.poll() is None:
            assert time.monotonic() < give_up, "the mesh did not come up"
            time.sleep(0.1)
        assert up.poll() is None, up.stdout.read()
        state = json.loads(state_file.read_text())
        llm_url = state["llm"]
        assert httpx.get(f"{llm_url}/models", timeout=5).status_code == 200

        done = subprocess.run(
            [*cli, "run", "--json", "--stream", "--agent", "researcher", *RUN_FLAGS],
            capture_output=True,
            text=True,
            timeout=120,
        )
        events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        deltas = [e for e in events if "llm_output_delta" in e]
        finished = [e["llm_call_finished"] for e in events if "llm_call_finished" in e]
        assert deltas, done.stdout + done.stderr
        assert finished and finished[0]["model"] == MODEL
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    # The model server went down with the mesh.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{llm_url}/models", timeout=2)
