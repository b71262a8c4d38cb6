"""Tokenizer building blocks shared by the tiny offline pipelines and the demo model."""

from __future__ import annotations


def byte_unicode() -> list[str]:
    """The GPT-2 / CLIP byte-to-unicode table: entry b is the printable character byte b maps to.

    transformers keeps this table as a private helper of its (slow) tokenizer modules, which moved
    between versions; it is 10 lines, so it lives here."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]
