"""Manifest rows as a job worker writes them, for tests that build an output folder by hand."""

import hashlib


def ok_row(store, item: str, data: bytes) -> dict:
    """Write ``data`` as item ``item``'s image in ``store``; its manifest row as a worker writes it."""
    rel = f"images/{item}.png"
    store.write_atomic(rel, data)
    return {
        "item": item,
        "status": "ok",
        "path": rel,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
