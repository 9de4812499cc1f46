"""`calculator`: arithmetic is parsed and walked, never executed as code."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agentplex.registry import schemas
from agentplex.tools.base import ToolContext, ToolFailure
from agentplex.tools.calculator import MAX_EXPONENT, Calculator, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("17*23", 391),
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("2*(3+4)*5", 70),
        ("10-4-3", 3),
        ("2^10", 1024),
        ("2**10", 1024),
        ("2^3^2", 512),  # right-associative like **
        ("-5+2", -3),
        ("-(2+3)", -5),
        ("--4", 4),
        ("+7", 7),
        ("-2**2", -4),
        ("(-2)**2", 4),
        ("7//2", 3),
        ("-7//2", -4),
        ("7%3", 1),
        ("6×7", 42),
        ("8÷2", 4),
        ("2**-1", 0.5),
        ("1 +  1 ", 2),
    ],
)
def test_evaluates_arithmetic(expression: str, expected: int | float) -> None:
    assert evaluate(expression) == expected


def test_multiplication_gives_an_exact_int() -> None:
    value = evaluate("17*23")
    assert value == 391
    assert type(value) is int


def test_division_gives_a_float_when_not_whole() -> None:
    value = evaluate("7/2")
    assert value == 3.5
    assert type(value) is float


def test_whole_division_gives_an_int() -> None:
    value = evaluate("8/2")
    assert value == 4
    assert type(value) is int


def test_fractions_stay_exact_until_the_end() -> None:
    # 0.1 + 0.2 in floats is 0.30000000000000004; as integer fractions it is exact.
    assert evaluate("1/10 + 2/10") == 0.3
    assert evaluate("(1/3)*3") == 1
    assert type(evaluate("(1/3)*3")) is int


def test_float_literals_are_allowed() -> None:
    assert evaluate("1.5*2") == 3.0
    assert math.isclose(evaluate("2**0.5"), math.sqrt(2))


def test_big_integers_are_exact() -> None:
    assert evaluate("2**100") == 2**100
    assert evaluate("2**100") == 1267650600228229401496703205376
    assert evaluate("99999999999999999999 * 99999999999999999999") == (10**20 - 1) ** 2
    assert evaluate("10**100 + 1") == Fraction(10**100 + 1)


def test_largest_allowed_exponent_works() -> None:
    assert evaluate(f"2**{MAX_EXPONENT}") == 2**MAX_EXPONENT


@pytest.mark.parametrize("expression", ["1/0", "1//0", "5%0", "1.0/0", "0**-1", "(2-2)/(3-3)"])
def test_division_by_zero_is_a_tool_failure(expression: str) -> None:
    with pytest.raises(ToolFailure) as info:
        evaluate(expression)
    assert info.value.code == "EXECUTION_FAILED"
    assert "division by zero" in info.value.message


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('touch /tmp/agentplex-pwned')",
        "a+1",
        "x",
        "(1).real",
        "abs(-1)",
        "print(1)",
        "[1, 2]",
        "(1, 2)",
        "{1: 2}",
        "'a' * 3",
        "True + 1",
        "None",
        "1j",
        "1 if 1 else 2",
        "1 < 2",
        "1 and 2",
        "lambda: 1",
        "1 << 4",
        "5 & 3",
        "~1",
        "not 1",
        "f'{1}'",
        "[x for x in ()]",
    ],
)
def test_anything_but_arithmetic_is_rejected(expression: str) -> None:
    with pytest.raises(ToolFailure) as info:
        evaluate(expression)
    assert info.value.code == "EXECUTION_FAILED"


def test_rejected_code_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    attempts = [
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
        f"open({str(marker)!r}, 'w')",
        f"exec(\"open({str(marker)!r}, 'w')\")",
    ]
    for expression in attempts:
        with pytest.raises(ToolFailure):
            evaluate(expression)
    assert not marker.exists()


@pytest.mark.parametrize(
    "expression", ["2**100000", "9**9**9", "2^1001", "10**-5000", "(-3)**1001", "2.0**5000"]
)
def test_huge_exponents_are_rejected(expression: str) -> None:
    with pytest.raises(ToolFailure) as info:
        evaluate(expression)
    assert "exponent" in info.value.message


def test_float_overflow_is_a_tool_failure() -> None:
    with pytest.raises(ToolFailure) as info:
        evaluate("10.0**400")
    assert "too large" in info.value.message


def test_results_with_too_many_digits_are_rejected() -> None:
    # 10**3996 has 3997 digits (allowed); 10**4000 has 4001: over MAX_DIGITS (4000)
    # but below Python's 4300-digit str() limit, so the tool's own check rejects it.
    assert evaluate("(10**999)**4") == 10**3996
    with pytest.raises(ToolFailure) as info:
        evaluate("(10**1000)**4")
    assert "too large" in info.value.message


@pytest.mark.parametrize("expression", [" 1+1", "  17 * 23", "\t2^3"])
def test_leading_whitespace_is_accepted(expression: str) -> None:
    assert evaluate(expression) in (2, 391, 8)


@pytest.mark.parametrize("expression", ["99999**1000", "(10**1000)**5"])
def test_results_beyond_python_str_limit_are_a_tool_failure(expression: str) -> None:
    with pytest.raises(ToolFailure) as info:
        evaluate(expression)
    assert "too large" in info.value.message


@pytest.mark.parametrize("expression", ["1e308*10", "1e309", "1e308*10 - 1e308*10"])
def test_non_finite_float_results_are_a_tool_failure(expression: str) -> None:
    with pytest.raises(ToolFailure):
        evaluate(expression)


@pytest.mark.parametrize(
    "expression", ["", "   ", "1+", "2**", "(1", "1)", "1 2", "#", "1+*2", "^^"]
)
def test_syntax_garbage_is_rejected(expression: str) -> None:
    with pytest.raises(ToolFailure) as info:
        evaluate(expression)
    assert info.value.code == "EXECUTION_FAILED"


def test_negative_base_fractional_power_is_not_real() -> None:
    with pytest.raises(ToolFailure) as info:
        evaluate("(-8)**(1/3)")
    assert "real" in info.value.message


def test_definition_is_a_valid_contract() -> None:
    definition = Calculator.definition
    schemas.check_definition(definition)
    assert definition.name == "calculator"
    assert definition.version == "1.0.0"
    assert schemas.schema_violation(definition.input_schema_json, {"expression": "1+1"}) is None
    assert schemas.schema_violation(definition.input_schema_json, {}) is not None


async def test_run_returns_expression_and_result(redis_client: aioredis.Redis) -> None:
    context = ToolContext(
        agent="assistant", session_id="s", task_id="t", redis=redis_client, key_prefix="unused"
    )
    result = await Calculator().run({"expression": "17*23"}, context)
    assert result == {"expression": "17*23", "result": 391}
    assert schemas.schema_violation(Calculator.definition.output_schema_json, result) is None
