"""What the OpenAPI documents' tests share (tests/ingress/test_openapi.py, tests/operations/test_api.py)."""
from __future__ import annotations

from typing import Any


def refs_in(node: Any) -> list[str]:
    """Every `$ref` in a JSON document, in document order."""
    if isinstance(node, dict):
        own = [v for k, v in node.items() if k == "$ref"]
        return own + [ref for value in node.values() for ref in refs_in(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs_in(value)]
    return []
