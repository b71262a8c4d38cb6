"""Which self-attention layers SEG perturbs (docs/design.md, "Which query, where").

Selectors, any mix of:
- ``mid``, ``down``, ``up``: every self-attention layer of that UNet part (the reference default is
  ``mid``);
- ``mid.3``, ``down.0``, ``up.12``: the i-th self-attention layer of that part, in module order (the
  reference code's ``m3`` / ``d0`` / ``u12``);
- a module name or a dotted prefix of one: ``up_blocks.0`` or
  ``mid_block.attentions.0.transformer_blocks.0.attn1``.

Only self-attention is eligible: diffusers ``Attention`` modules named ``attn1`` that are not
cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

GROUPS = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def self_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All self-attention (``attn1``) modules of ``model`` by name, in module order."""
    from diffusers.models.attention_processor import Attention

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, Attention) and name.split(".")[-1] == "attn1" and not module.is_cross_attention
    }


def group_of(name: str) -> str:
    return GROUPS.get(name.split(".")[0], name.split(".")[0])


def _groups(names: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    return groups


def select_layers(model: nn.Module, selectors: Sequence[str]) -> list[str]:
    """Resolve ``selectors`` to self-attention module names (module order, no duplicates).

    A selector that matches nothing raises ``ValueError`` listing what exists.
    """
    names = list(self_attention_layers(model))
    groups = _groups(names)
    return resolve(
        selectors, names, lambda sel: _match(sel, names, groups), "self-attention", lambda: describe(names)
    )


def resolve(
    selectors: Sequence[str],
    names: Sequence[str],
    match: Callable[[str], list[str]],
    what: str,
    available: Callable[[], str],
) -> list[str]:
    """The layers ``match`` finds for each selector, in ``names``' order, without duplicates; a
    selector that matches nothing raises one line naming it and what is ``available``."""
    chosen: set[str] = set()
    for sel in selectors:
        matched = match(sel)
        if not matched:
            raise ValueError(f"seg layer {sel!r} matches no {what} layer; {available()}")
        chosen.update(matched)
    return [n for n in names if n in chosen]


def _match(sel: str, names: list[str], groups: dict[str, list[str]]) -> list[str]:
    if sel in groups:
        return groups[sel]
    head, _, index = sel.partition(".")
    if head in groups and index.isdigit():
        i = int(index)
        return [groups[head][i]] if i < len(groups[head]) else []
    return [n for n in names if n == sel or n.startswith(sel + ".")]


def describe(names: Sequence[str]) -> str:
    """One line naming the groups, their index ranges and a sample module name."""
    if not names:
        return "this model has no self-attention (attn1) layers"
    parts = [f"{g} ({len(v)}: {g}.0-{g}.{len(v) - 1})" for g, v in _groups(names).items()]
    return f"available: {', '.join(parts)}, or a module name such as {names[0]!r}"


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
"""A transformer's block lists, in forward order (Flux runs its double-stream ``transformer_blocks``,
then its ``single_transformer_blocks``; Wan calls its list ``blocks``)."""


def transformer_blocks(model: nn.Module) -> list[str]:
    """Module names of ``model``'s top-level transformer blocks in forward order."""
    names = []
    for attr in BLOCK_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, nn.ModuleList):
            names += [f"{attr}.{i}" for i in range(len(blocks))]
    return names
