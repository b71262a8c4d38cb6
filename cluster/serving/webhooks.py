"""Webhooks: when a job with a ``webhook_url`` ends (succeeded, failed or cancelled), the server
POSTs the job's status (``GET /v1/jobs/{id}``'s JSON) to it.

Only URLs whose host is on the server's allow-list (``webhooks.allow_hosts``; default: none) are
taken, checked when the job is submitted (a 422 naming the host) and again before sending, so a
client cannot make the server call arbitrary addresses; redirects are not followed. The body is
signed: ``X-Seg-Rt-Signature: sha256=<hex HMAC-SHA256 of the body with the server's secret>``
(``webhooks.secret`` or ``SEG_RT_WEBHOOK_SECRET``), as GitHub's ``X-Hub-Signature-256``. A failed
delivery (no answer, 408, 429 or 5xx) is retried ``attempts`` times in all with exponential backoff;
one sender thread delivers, so a slow receiver never holds up sampling.
"""

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

SECRET_ENV = "SEG_RT_WEBHOOK_SECRET"
SIGNATURE_HEADER = "X-Seg-Rt-Signature"
RETRY_STATUSES = {408, 429} | set(range(500, 600))


class WebhookSettings(BaseModel):
    """``webhooks:`` in the server config."""

    model_config = ConfigDict(extra="forbid")
    allow_hosts: list[str] = Field(
        default_factory=list, description="hosts webhooks may go to (default: none)"
    )
    secret: str | None = Field(None, repr=False, description=f"HMAC key; default: ${SECRET_ENV}")
    attempts: int = Field(5, ge=1, le=20)
    backoff_s: float = Field(1.0, ge=0, allow_inf_nan=False, description="first retry's wait; doubles")
    timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_url(url: str, allow_hosts: list[str]) -> str:
    """``url`` when it is http(s) to an allowed host; else a ``ValueError`` naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook_url must be an http or https URL, got {url[:200]!r}")
    if parts.username or parts.password:
        raise ValueError("webhook_url must not carry a user name or password")
    host = parts.hostname.lower()
    if host not in {h.lower() for h in allow_hosts}:
        allowed = ", ".join(allow_hosts) if allow_hosts else "none"
        raise ValueError(
            f"webhook_url host {host!r} is not allowed by the server (webhooks.allow_hosts: {allowed})"
        )
    return url


class Sender:
    """Delivers job statuses to their webhooks from one thread, with retries and backoff."""

    def __init__(self, settings: WebhookSettings, secret: str | None, metrics=None) -> None:
        self.settings, self.secret, self.metrics = settings, secret, metrics
        self.queue: queue.Queue = queue.Queue()
        self.deliveries: list[tuple[str, int | None]] = []  # (url, final status) for tests and logs
        self._thread = threading.Thread(target=self._run, name="seg-rt-webhooks", daemon=True)
        self._thread.start()

    def send(self, url: str, payload: dict) -> None:
        self.queue.put((url, payload))

    def close(self, timeout: float = 30.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhooks.labels(outcome=outcome).inc()

    def _run(self) -> None:
        # the standard library's client, without its redirect handler: a 3xx is the final answer
        opener = urllib.request.OpenerDirector()
        handlers = (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, urllib.request.HTTPErrorProcessor, urllib.request.HTTPDefaultErrorHandler)  # fmt: skip
        for handler in handlers:
            opener.add_handler(handler())
        while (item := self.queue.get()) is not None:
            self._deliver(opener, *item)

    def _post(self, opener, url: str, body: bytes, headers: dict) -> int:
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with opener.open(req, timeout=self.settings.timeout_s) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def _deliver(self, opener, url: str, payload: dict) -> None:
        try:
            check_url(url, self.settings.allow_hosts)
        except ValueError as exc:
            logger.warning("webhook not sent: %s", exc)
            self._count("refused")
            return
        body = json.dumps(payload, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "seg-rt-webhook"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        status = None
        for attempt in range(self.settings.attempts):
            if attempt:
                self._count("retried")
                time.sleep(self.settings.backoff_s * 2 ** (attempt - 1))
            try:
                status = self._post(opener, url, body, headers)
            except Exception as exc:  # no answer: retried
                logger.info("webhook %s: %s", urlsplit(url).hostname, type(exc).__name__)
                status = None
                continue
            if status not in RETRY_STATUSES:
                break
        ok = status is not None and 200 <= status < 300
        self._count("delivered" if ok else "failed")
        self.deliveries.append((url, status))
