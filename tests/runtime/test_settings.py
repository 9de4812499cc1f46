"""Settings: defaults, and the AGENTPLEX_ environment prefix."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentplex.runtime.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AGENTPLEX_* variables, and a scratch working directory."""
    for name in list(os.environ):
        if name.upper().startswith("AGENTPLEX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.key_prefix == "agentplex"
    assert settings.memory_address == "127.0.0.1:50051"
    assert settings.registry_address == "127.0.0.1:50052"
    assert settings.grace_seconds == 10.0
    assert settings.health_interval_seconds == 1.0
    assert settings.log_level == "INFO"
    assert settings.trace_exporter == "none"
    assert settings.memory_ttl_seconds == 7 * 24 * 3600
    assert settings.memory_default_context_tokens == 2048
    assert settings.memory_max_messages == 1000
    assert settings.docs_dir is None  # docs.search: the documentation shipped with agentplex
    assert settings.tool_timeout_seconds == 10.0
    assert settings.llm_provider == "scripted"
    assert settings.openai_api_key.get_secret_value() == ""
    assert settings.context_tokens == 2048
    assert settings.default_task_timeout_seconds == 300.0


def test_environment_with_prefix_is_read(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("AGENTPLEX_REDIS_URL", "redis://10.0.0.5:6380/2")
    clean_env.setenv("AGENTPLEX_KEY_PREFIX", "staging")
    clean_env.setenv("AGENTPLEX_GRACE_SECONDS", "2.5")
    clean_env.setenv("AGENTPLEX_HEALTH_INTERVAL_SECONDS", "0.25")
    clean_env.setenv("AGENTPLEX_MEMORY_TTL_SECONDS", "3600")
    clean_env.setenv("AGENTPLEX_MEMORY_MAX_MESSAGES", "50")
    clean_env.setenv("AGENTPLEX_TRACE_EXPORTER", "console")
    clean_env.setenv("AGENTPLEX_LLM_PROVIDER", "openai")
    clean_env.setenv("AGENTPLEX_DOCS_DIR", str(tmp_path / "docs"))
    settings = Settings()
    assert settings.redis_url == "redis://10.0.0.5:6380/2"
    assert settings.key_prefix == "staging"
    assert settings.grace_seconds == 2.5
    assert settings.health_interval_seconds == 0.25
    assert settings.memory_ttl_seconds == 3600
    assert settings.memory_max_messages == 50
    assert settings.trace_exporter == "console"
    assert settings.llm_provider == "openai"
    assert settings.docs_dir == tmp_path / "docs"


def test_prefix_is_case_insensitive(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("agentplex_key_prefix", "lower")
    assert Settings().key_prefix == "lower"


def test_unprefixed_and_unknown_variables_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REDIS_URL", "redis://elsewhere:1/0")
    clean_env.setenv("KEY_PREFIX", "nope")
    clean_env.setenv("AGENTPLEX_NO_SUCH_SETTING", "whatever")
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.key_prefix == "agentplex"


def test_explicit_values_override_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AGENTPLEX_KEY_PREFIX", "from-env")
    assert Settings(key_prefix="explicit").key_prefix == "explicit"


def test_api_key_is_secret(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AGENTPLEX_OPENAI_API_KEY", "sk-very-secret")
    settings = Settings()
    assert settings.openai_api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(settings)
    assert "sk-very-secret" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AGENTPLEX_GRACE_SECONDS", "-1"),
        ("AGENTPLEX_HEALTH_INTERVAL_SECONDS", "0"),
        ("AGENTPLEX_MEMORY_TTL_SECONDS", "59"),
        ("AGENTPLEX_MEMORY_MAX_MESSAGES", "1"),
        ("AGENTPLEX_MEMORY_DEFAULT_CONTEXT_TOKENS", "0"),
        ("AGENTPLEX_CONTEXT_TOKENS", "63"),
        ("AGENTPLEX_TRACE_EXPORTER", "jaeger"),
        ("AGENTPLEX_LLM_PROVIDER", "magic"),
        ("AGENTPLEX_GRACE_SECONDS", "soon"),
    ],
)
def test_invalid_values_are_rejected(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_model_copy_keeps_other_fields(clean_env: pytest.MonkeyPatch) -> None:
    base = Settings(key_prefix="base", grace_seconds=3)
    copy = base.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    assert copy.redis_url == "redis://127.0.0.1:1/0"
    assert copy.key_prefix == "base"
    assert copy.grace_seconds == 3
    assert base.redis_url == "redis://127.0.0.1:6379/0"


def test_every_part_reads_its_section_from_the_same_class(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.event_loop == "auto"
    assert settings.state_file == Path(".agentplex/mesh.json")
    assert settings.external_redis_url is None
    assert settings.gateway_listen_port == 8080
    assert settings.gateway_directory_poll_seconds == 0.5
    assert settings.gateway_console is True


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("AGENTPLEX_EVENT_LOOP", " AsyncIO ", "event_loop", "asyncio"),
        ("AGENTPLEX_EVENT_LOOP", "", "event_loop", "auto"),
        ("AGENTPLEX_STATE_FILE", "/tmp/elsewhere.json", "state_file", Path("/tmp/elsewhere.json")),
        ("AGENTPLEX_GATEWAY_LISTEN_PORT", "0", "gateway_listen_port", 0),
        (
            "AGENTPLEX_GATEWAY_CORS_ORIGINS",
            "http://a,http://b",
            "gateway_cors_origins",
            "http://a,http://b",
        ),
        ("AGENTPLEX_GATEWAY_CONSOLE", "false", "gateway_console", False),
        ("AGENTPLEX_LLM_PROVIDER", "local", "llm_provider", "local"),
        # The standard variable, without the prefix: `agentplex up` uses that Redis.
        ("REDIS_URL", "redis://10.0.0.9:6379/0", "external_redis_url", "redis://10.0.0.9:6379/0"),
        ("REDIS_URL", "", "external_redis_url", None),
    ],
)
def test_variables_that_used_to_be_read_elsewhere(
    clean_env: pytest.MonkeyPatch, name: str, value: str, field: str, expected: object
) -> None:
    clean_env.setenv(name, value)
    assert getattr(Settings(), field) == expected


def test_the_standard_variable_comes_after_the_prefixed_one(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("REDIS_URL", "redis://standard:1/0")
    clean_env.setenv("AGENTPLEX_EXTERNAL_REDIS_URL", "redis://prefixed:1/0")
    assert Settings().external_redis_url == "redis://prefixed:1/0"
    assert Settings(external_redis_url="redis://given:1/0").external_redis_url == (
        "redis://given:1/0"
    )


def test_redis_url_and_the_standard_variable_stay_apart(clean_env: pytest.MonkeyPatch) -> None:
    """REDIS_URL must not swallow `redis_url=` (as a case-insensitive alias would)."""
    clean_env.setenv("REDIS_URL", "redis://standard:1/0")
    settings = Settings(redis_url="redis://mine:1/0")
    assert settings.redis_url == "redis://mine:1/0"
    assert settings.external_redis_url == "redis://standard:1/0"
    assert Settings(redis_url="redis://mine:1/0").model_copy().redis_url == "redis://mine:1/0"


@pytest.mark.parametrize(
    ("name", "value"),
    [("AGENTPLEX_GATEWAY_LISTEN_PORT", "70000"), ("AGENTPLEX_GATEWAY_MAX_REQUEST_BYTES", "10")],
)
def test_invalid_gateway_values_are_rejected(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_the_gateway_reads_its_section_under_short_names(clean_env: pytest.MonkeyPatch) -> None:
    from agentplex.gateway.settings import PREFIX, GatewaySettings
    from agentplex.runtime.settings import GatewaySection

    assert {PREFIX + name for name in GatewaySettings.model_fields} == set(
        GatewaySection.model_fields
    )
    # Built directly (tests, the bench), the defaults are the section's.
    defaults = Settings()
    assert GatewaySettings() == GatewaySettings.from_settings(defaults)

    clean_env.setenv("AGENTPLEX_GATEWAY_LISTEN_PORT", "0")
    clean_env.setenv("AGENTPLEX_GATEWAY_CORS_ORIGINS", " http://a , http://b ")
    gateway = GatewaySettings.from_settings(Settings())
    assert gateway.listen_port == 0
    assert gateway.options().cors_origins == ("http://a", "http://b")
    assert gateway.options().listen_port == 0


SOURCE_PACKAGES = [
    "runtime",
    "mesh",
    "gateway",
    "agents",
    "registry",
    "memory",
    "tools",
    "tasks",
    "clients",
    "contract",
]
# The settings module itself, and handing the environment on to child processes
# (which is not reading settings).
ALLOWED_READS = {
    "runtime/settings.py": None,
    "mesh/launcher.py": "_child_env",
    # Sets a gRPC variable before grpc is imported (a write for grpc, not a setting).
    "mesh/__init__.py": None,
}
ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb"}


def environment_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, enclosing function) of every use of os.environ / os.getenv in a module."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if (isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_NAMES) or (
            isinstance(node, ast.Name) and node.id in ENVIRONMENT_NAMES
        ):
            found.append((node.lineno, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def test_nothing_but_settings_reads_the_environment() -> None:
    root = Path(__file__).resolve().parents[2]
    reads = [
        f"{relative}:{line} (in {function or 'the module'})"
        for package in SOURCE_PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        for relative in [path.relative_to(root).as_posix()]
        for line, function in environment_reads(ast.parse(path.read_text()))
        if relative not in ALLOWED_READS or ALLOWED_READS[relative] not in (None, function)
    ]
    assert reads == [], "read settings through runtime/settings.py (Settings) instead"
