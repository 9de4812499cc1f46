"""LLM providers behind one small interface (`LLMProvider`).

`scripted` is a deterministic offline test model; `openai` speaks to any
OpenAI-compatible chat-completions endpoint. The runner only sees the
interface, so swapping models is configuration.
"""
