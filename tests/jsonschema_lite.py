"""Just enough JSON Schema checking for the shapes our tests ask models for."""

from __future__ import annotations

from typing import Any


def validate(value: Any, schema: dict[str, Any]) -> None:
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"expected an object, got {value!r}"
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"missing {key!r} in {value!r}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"unexpected keys {extra}"
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub)
    elif kind == "string":
        assert isinstance(value, str), f"expected a string, got {value!r}"
    if "enum" in schema:
        assert value in schema["enum"], f"{value!r} not in {schema['enum']}"
