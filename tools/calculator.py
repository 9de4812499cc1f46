"""`calculator`: exact arithmetic on an expression, parsed, never evaluated as code.

Python's `ast` only parses the text; a small walker then computes the value
from an allow-list of number literals and arithmetic operators. Names, calls,
attributes and everything else are rejected, and exponents are bounded so a
model cannot ask for a number that eats the process.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from agentplex.tools.base import ToolContext, ToolFailure, define
from agentplex.v1 import tool_pb2

MAX_EXPRESSION_LENGTH = 500
MAX_EXPONENT = 1000
MAX_DIGITS = 4000

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
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ToolFailure(f"not an arithmetic expression: {expression!r}") from exc
    value = _walk(tree.body)
    if isinstance(value, Fraction):
        return int(value) if value.denominator == 1 else float(value)
    return value


def _walk(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(node.value) if isinstance(node.value, int) else node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolFailure(f"exponent {right} is larger than {MAX_EXPONENT}")
        if isinstance(node.op, ast.Pow) and isinstance(right, Fraction) and right.denominator != 1:
            left, right = float(left), float(right)
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as exc:
            raise ToolFailure("division by zero") from exc
        except OverflowError as exc:
            raise ToolFailure("result is too large") from exc
        if isinstance(result, Fraction) and len(str(result.numerator)) > MAX_DIGITS:
            raise ToolFailure("result is too large")
        if isinstance(result, complex):
            raise ToolFailure("result is not a real number")
        return result
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
