"""Backward-compatibility of tool contracts: what a new version may not change.

Inputs flow from callers to the tool, so a new version must accept every
argument object the old one accepted: no property removed, no new required
property, no narrower type, no enum value removed, `additionalProperties` not
closed, no constraint tightened. Outputs flow the other way, so a new version
must keep giving readers what they relied on: no output property removed or
made optional, no type widened or changed, no enum value added.

Argument policies and `requires_approval` are not compared: tightening them
(a host list narrowed, a policy added, approval required) is allowed in a minor
version, and so is loosening them. A policy is a security boundary, not a
shape: a call it refuses gets a POLICY_DENIED error the model can read and
route around, and a tightening is usually a fix that must reach every caller
at once. Hot registration gives a new minor to agents pinned to its major on
their next step; a new major would leave them on the looser policy.

The check walks `properties` and `items` recursively and reports every break
with its JSON path, so a rejected registration says exactly what to fix (or
that it needs a new major version).
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# Keywords that only describe, never constrain.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "examples",
        "default",
        "$comment",
        "$schema",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",
    }
)

# Constraints where a larger value accepts less ("min" side) or more ("max" side).
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def input_breaks(old: Schema | bool, new: Schema | bool, path: str = "$") -> list[str]:
    """Ways `new` rejects arguments that `old` accepted."""
    if isinstance(old, bool) or isinstance(new, bool):
        # true accepts anything, false nothing.
        accepts_all_old = old is True or old == {}
        return (
            []
            if new is True or new == {} or old is False
            else (
                [f"{path}: narrowed from accepting anything"]
                if accepts_all_old
                else _opaque(path, old, new)
            )
        )
    breaks: list[str] = _unknown_changes(old, new, path)
    old_types, new_types = _types(old), _types(new)
    if old_types and new_types and not old_types <= _widen(new_types):
        breaks.append(f"{path}: type narrowed from {_fmt(old_types)} to {_fmt(new_types)}")
    if new_types and not old_types:
        breaks.append(f"{path}: type restricted to {_fmt(new_types)}")
    if "enum" in old or "enum" in new:
        removed = _enum_values(old) - _enum_values(new) if "enum" in new else set()
        if "enum" in new and "enum" not in old:
            breaks.append(f"{path}: enum added (only {sorted(map(str, _enum_values(new)))})")
        elif removed:
            breaks.append(f"{path}: enum value(s) removed: {sorted(map(str, removed))}")
    if "const" in new and old.get("const") != new["const"]:
        breaks.append(f"{path}: const {new['const']!r} added")
    for key in _LOWER_BOUNDS:
        if key in new and (key not in old or new[key] > old[key]):
            breaks.append(f"{path}: {key} tightened from {old.get(key, 'none')} to {new[key]}")
    for key in _UPPER_BOUNDS:
        if key in new and (key not in old or new[key] < old[key]):
            breaks.append(f"{path}: {key} tightened from {old.get(key, 'none')} to {new[key]}")
    if "pattern" in new and new.get("pattern") != old.get("pattern"):
        breaks.append(
            f"{path}: pattern {'added' if 'pattern' not in old else 'changed'}: {new['pattern']!r}"
        )
    if "multipleOf" in new and new.get("multipleOf") != old.get("multipleOf"):
        breaks.append(f"{path}: multipleOf {new['multipleOf']} added")

    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name in sorted(set(old_props) - set(new_props)):
        breaks.append(f"{path}.{name}: property removed")
    for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
        breaks.append(f"{path}.{name}: property became required")
    if _closed(new) and not _closed(old):
        breaks.append(f"{path}: additionalProperties closed")
    elif isinstance(new.get("additionalProperties"), dict) and new.get(
        "additionalProperties"
    ) != old.get("additionalProperties"):
        breaks.append(f"{path}: additionalProperties constrained")
    for name in sorted(set(old_props) & set(new_props)):
        breaks.extend(input_breaks(old_props[name], new_props[name], f"{path}.{name}"))
    if "items" in new:
        breaks.extend(input_breaks(old.get("items", True), new["items"], f"{path}[]"))
    return breaks


def output_breaks(old: Schema | bool, new: Schema | bool, path: str = "$") -> list[str]:
    """Ways `new` may return results that readers of `old` cannot handle."""
    if isinstance(old, bool) or isinstance(new, bool):
        return [] if new == old or old is True or old == {} else _opaque(path, old, new)
    breaks: list[str] = _unknown_changes(old, new, path)
    old_types, new_types = _types(old), _types(new)
    if old_types and (not new_types or not new_types <= _widen(old_types)):
        breaks.append(f"{path}: type changed from {_fmt(old_types)} to {_fmt(new_types)}")
    if "enum" in old:
        added = _enum_values(new) - _enum_values(old) if "enum" in new else {"(any value)"}
        if added:
            breaks.append(f"{path}: enum value(s) added: {sorted(map(str, added))}")
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name in sorted(set(old_props) - set(new_props)):
        breaks.append(f"{path}.{name}: output property removed")
    for name in sorted(set(old.get("required", [])) - set(new.get("required", []))):
        if name in new_props:
            breaks.append(f"{path}.{name}: output property no longer always present")
    for name in sorted(set(old_props) & set(new_props)):
        breaks.extend(output_breaks(old_props[name], new_props[name], f"{path}.{name}"))
    if "items" in old:
        breaks.extend(output_breaks(old["items"], new.get("items", True), f"{path}[]"))
    if "const" in old and new.get("const") != old["const"]:
        breaks.append(f"{path}: const {old['const']!r} no longer guaranteed")
    return breaks


def _unknown_changes(old: Schema, new: Schema, path: str) -> list[str]:
    """Keywords this checker does not analyse ($ref, anyOf, prefixItems, …): any
    change to them is reported, because compatibility cannot be proven."""
    understood = _ANNOTATIONS | _HANDLED
    return [
        f"{path}: '{key}' changed (not analysed; treated as breaking)"
        for key in sorted((set(old) | set(new)) - understood)
        if old.get(key) != new.get(key)
    ]


def _opaque(path: str, old: object, new: object) -> list[str]:
    return [f"{path}: schema changed from {old!r} to {new!r}"]


_HANDLED = frozenset(
    {
        "type",
        "enum",
        "const",
        "pattern",
        "multipleOf",
        "properties",
        "required",
        "additionalProperties",
        "items",
        *_LOWER_BOUNDS,
        *_UPPER_BOUNDS,
    }
)


def _types(schema: Schema) -> set[str]:
    kind = schema.get("type")
    if kind is None:
        return set()
    return {kind} if isinstance(kind, str) else set(kind)


def _widen(types: set[str]) -> set[str]:
    # Every integer is a number: "integer" → "number" widens, never narrows.
    return types | {"integer"} if "number" in types else types


def _enum_values(schema: Schema) -> set[Any]:
    return {repr(value) for value in schema.get("enum", [])}


def _closed(schema: Schema) -> bool:
    return schema.get("additionalProperties") is False


def _fmt(types: set[str]) -> str:
    if not types:
        return "any"
    return "|".join(sorted(types))
