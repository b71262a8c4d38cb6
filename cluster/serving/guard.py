"""Guards every route of the app shares, installed in one place (``install``) around the whole app,
so routes added later are covered too.

- **Trusted hosts** (DNS rebinding): a web page whose name resolves to 127.0.0.1 makes the browser
  send requests with ``Host: evil.example`` to the keyless loopback server. Only loopback names,
  the bound host and the configured ``trusted_hosts`` are answered; anything else is a 400 in the
  error shape of the API that owns the path. A server bound to a wildcard address (``0.0.0.0``,
  ``::``; it needs an API key) answers any ``Host`` unless ``trusted_hosts`` names them. Starlette's
  ``TrustedHostMiddleware`` answers in plain text, not in each API's error shape, hence this one.
- **Security headers**: every answer carries ``X-Content-Type-Options: nosniff``,
  ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``; HTML answers (the playground)
  a ``Content-Security-Policy`` allowing only the page's own inline script (by its sha256) and
  requests to the server itself.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def host_name(value: str) -> str:
    """A ``Host`` header's name: lower-case, without port, brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def trusted_hosts(bound: str, configured: Iterable[str] = ()) -> frozenset[str] | None:
    """The ``Host`` names a server bound to ``bound`` answers (loopback is always among them);
    ``None``: any (a wildcard bind with no configured names, or ``*`` configured)."""
    names = {host_name(h) for h in configured}
    if "*" in names or (not names and host_name(bound) in WILDCARD_HOSTS):
        return None
    if host_name(bound) not in WILDCARD_HOSTS:
        names.add(host_name(bound))
    return frozenset(names | LOOPBACK_NAMES)


class HostGuard:
    """ASGI middleware: refuse a request whose ``Host`` is not trusted (400), before any route runs."""

    def __init__(self, app, *, allowed: frozenset[str] | None, reply) -> None:
        self.app, self.allowed, self.reply = app, allowed, reply

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        raw = next((v for k, v in scope.get("headers", []) if k.lower() == b"host"), b"")
        name = host_name(raw.decode("latin-1"))
        if name in self.allowed or _is_loopback(name):
            return await self.app(scope, receive, send)
        shown = raw.decode("latin-1")[:100]
        await self.reply(
            send,
            scope,
            400,
            f"Host {shown!r} is not served here (add it to trusted_hosts in the server config)",
        )


NONE = "'none'"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
BASE_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def content_security_policy(html: str) -> str:
    """The playground's CSP: its own inline scripts by hash, styles inline, images from data: URLs
    (the answers), requests only to this server, no framing."""
    scripts = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src {scripts or NONE}; style-src 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class SecurityHeaders:
    """ASGI middleware: the headers above on every answer; the CSP on HTML answers."""

    def __init__(self, app, *, csp: str) -> None:
        self.app, self.csp = app, csp.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in BASE_HEADERS if k not in present]
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if ctype.startswith(b"text/html") and b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", self.csp))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app, *, host: str, trusted: Sequence[str], page_html: str, reply) -> None:
    """Wrap ``app`` (FastAPI / Starlette) in the guards; call after every other middleware is
    added so they run first. ``reply(send, scope, status, message)`` writes an error answer in the
    shape of the API that owns the path."""
    app.add_middleware(HostGuard, allowed=trusted_hosts(host, trusted), reply=reply)
    app.add_middleware(SecurityHeaders, csp=content_security_policy(page_html))  # outermost
