"""Reading JSON / YAML that someone else wrote: one loader for every such file (``seg_rt.json``,
``model_index.json``, a model's config files, a job file, a JSONL prompt line, the serve config).

``json.loads`` and ``yaml.safe_load`` recurse once per nesting level: a few KB of ``[[[[...``
(about 5,000 levels) end in an uncaught ``RecursionError`` instead of an error naming the file.
Here they end in one ``ValueError`` line; anything nested deeper than ``MAX_DEPTH`` levels (no
seg-rt file needs more than a handful) is refused the same way, so validators further on never see
a structure deep enough to exhaust the stack either.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # nesting levels (objects / lists) accepted in any file seg-rt reads


def _depth(value: Any) -> int:
    """Nesting depth of a parsed value (at most ``MAX_DEPTH + 1``), iteratively (no recursion to
    exhaust). YAML aliases share nodes (and may form a cycle): a node is walked again only when
    reached deeper than before, so shared nodes cost one walk per depth, and a cycle stops past
    ``MAX_DEPTH``."""
    deepest, stack, seen = 0, [(value, 1)], {}
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if seen.get(id(node), 0) >= level:
            continue
        seen[id(node)] = level
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _too_deep(what: str) -> ValueError:
    return ValueError(f"{what}: nested deeper than {MAX_DEPTH} levels")


def _checked(value: Any, what: str) -> Any:
    if _depth(value) > MAX_DEPTH:
        raise _too_deep(what)
    return value


def loads_json(text: str | bytes, what: str) -> Any:
    """``json.loads(text)``; a nesting too deep is one ``ValueError`` naming ``what`` (invalid
    JSON stays ``json.JSONDecodeError``, a ``ValueError`` too)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep(what) from None
    return _checked(value, what)


def safe_load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)`` (no tags that build objects); a nesting too deep is one
    ``ValueError`` naming ``what`` (invalid YAML stays ``yaml.YAMLError``)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise _too_deep(what) from None
    return _checked(value, what)
