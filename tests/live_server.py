"""Test-only: serve an ASGI app with uvicorn in a thread on a free loopback port (no Ray)."""

import contextlib
import threading
import time
from collections.abc import Iterator

import torch
import uvicorn

from .ray_helpers import free_port


@contextlib.contextmanager
def live_server(app, timeout: float = 30.0) -> Iterator[str]:
    """``app`` on ``http://127.0.0.1:PORT`` until the block ends; yields that base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """CPU results depend on the thread count: the server thread and the reference share this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
