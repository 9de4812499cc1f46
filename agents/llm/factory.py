"""Builds the configured LLM provider from settings."""

from __future__ import annotations

from agentplex.agents.llm.base import LLMProvider
from agentplex.agents.llm.scripted import ScriptedLLM
from agentplex.runtime.settings import Settings


def build_provider(settings: Settings) -> LLMProvider:
    if settings.llm_provider == "openai":
        from agentplex.agents.llm.openai import OpenAIProvider

        return OpenAIProvider(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key.get_secret_value(),
            model=settings.openai_model,
            timeout_seconds=settings.llm_timeout_seconds,
        )
    return ScriptedLLM(delay_seconds=settings.scripted_delay_seconds)
