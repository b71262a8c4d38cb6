"""Test-only: the listening TCP sockets of a process tree, from the OS (psutil / /proc/net/tcp*)."""

from __future__ import annotations

import contextlib
import ipaddress
import os

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every process it started (Ray's gcs_server, raylet, agents and workers included)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(pids) -> list[tuple[int, str, str, int]]:
    """``(pid, process name, ip, port)`` of every TCP socket in LISTEN state held by ``pids``."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
            name = f"{proc.name()} {os.path.basename(cmdline[0]) if cmdline else ''}"
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((pid, name, c.laddr.ip, c.laddr.port))
    return found


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to v4 loopback
    return (mapped or addr).is_loopback


def not_on_loopback(pids) -> list[tuple[int, str, str, int]]:
    return [s for s in listening(pids) if not is_loopback(s[2])]
