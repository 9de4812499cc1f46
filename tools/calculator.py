"""`calculator`: exact arithmetic on an expression, parsed, never evaluated as code.

Python's `ast` only parses the text; a small walker then computes the value
from an allow-list of number literals and arithmetic operators. Names, calls,
attributes and everything else are rejected, and exponents are bounded so a
model cannot ask for a number that eats the process.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from agentplex.contract.tool_definition import define
from agentplex.tools.base import ToolContext, ToolFailure
from agentplex.v1 import tool_pb2

MAX_EXPRESSION_LENGTH = 500
MAX_EXPONENT = 1000
MAX_DIGITS = 4000
# Sizes are compared numerically, never by printing: str() of a huge int is
# itself slow and, past 4300 digits, refused by Python.
_TOO_LARGE = 10**MAX_DIGITS
_MAX_BITS = _TOO_LARGE.bit_length()

# What the walker computes with: Fractions (exact), floats (after a fractional
# power), ints (floor division).
_Real = Fraction | int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def evaluate(expression: str) -> int | float:
    """Value of an arithmetic expression; raises ToolFailure on anything else."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ToolFailure(f"not an arithmetic expression: {expression!r}") from exc
    value = _walk(tree.body)
    if isinstance(value, Fraction):
        if value.denominator == 1:
            return int(value)
        try:
            return _finite(float(value))
        except OverflowError as exc:
            raise ToolFailure("result is too large") from exc
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ToolFailure("result is too large")
    return value


def _check_size(value: object) -> _Real:
    if isinstance(value, Fraction):
        if abs(value.numerator) >= _TOO_LARGE or value.denominator >= _TOO_LARGE:
            raise ToolFailure("result is too large")
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, int):
        return value
    raise ToolFailure("result is not a real number")  # a complex: a negative's fractional power


def _magnitude(value: _Real) -> _Real:
    return -value if value < 0 else value  # abs() of the union: mypy can only join the types


def _walk(node: ast.AST) -> _Real:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(Fraction(node.value) if isinstance(node.value, int) else node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check_size(_UNARY[type(node.op)](_walk(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and _magnitude(right) > MAX_EXPONENT:
            raise ToolFailure(f"exponent {right} is larger than {MAX_EXPONENT}")
        if isinstance(node.op, ast.Pow) and isinstance(right, Fraction) and right.denominator != 1:
            left, right = float(left), float(right)
        if isinstance(node.op, ast.Pow) and isinstance(left, Fraction):
            # Refuse before computing what is certainly too large: x**n has at
            # least (bits(x) - 1) * n + 1 bits.
            bits = max(left.numerator.bit_length(), left.denominator.bit_length())
            if (bits - 1) * _magnitude(right) >= _MAX_BITS:
                raise ToolFailure("result is too large")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as exc:
            raise ToolFailure("division by zero") from exc
        except OverflowError as exc:
            raise ToolFailure("result is too large") from exc
        return _check_size(result)
    raise ToolFailure(f"unsupported syntax in expression: {ast.dump(node)[:60]}")


class Calculator:
    definition = define(
        name="calculator",
        version="1.0.0",
        description="Evaluates an arithmetic expression exactly: + - * / // % ** and parentheses.",
        input_schema={
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_EXPRESSION_LENGTH,
                    "description": "Arithmetic expression, e.g. '17*23' or '(2+3)**2'.",
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"expression": {"type": "string"}, "result": {"type": "number"}},
            "required": ["expression", "result"],
        },
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )

    async def run(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        expression = arguments["expression"]
        return {"expression": expression, "result": evaluate(expression)}
