"""Completion webhooks: a video job that names a `callback_url` has its record POSTed there once
it ends (completed, failed, cancelled), signed, retried with backoff, every attempt kept in the
record (`job.webhook`) -- without holding up the event loop or the job queue.

    submit:   check(callback_url)  the URL's form, the allow-list, every address of its host -> 422
    the end:  finished(job)        a task on the event loop: deliver(job)
    deliver:  resolve + check again (a name may now point elsewhere: DNS rebinding), POST to the
              very address checked (Host header and TLS name the host), up to max_attempts

The signature is Stripe's scheme: HMAC-SHA256 over f"{timestamp}.{body}" with the configured
secret, sent as `X-Avatar-Serve-Signature: sha256=<hex>` beside `X-Avatar-Serve-Timestamp`.
Redirects are not followed, the answer's body is never read, and proxies in the environment are
not used (they would connect to an address we did not check).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

import certifi
import httpx

from deployments.api.protocol import ApiError, Job, Queued, Webhook, WebhookAttempt
from deployments.config_serving import WebhookConfig

log = logging.getLogger("avatar_serve.webhooks")

PARAM = "callback_url"
HEADER = "X-Avatar-Serve-"  # -Id, -Attempt, -Event, -Timestamp, -Signature
USER_AGENT = "avatar-serve-webhooks/1"
HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# IPv6 ranges that carry an IPv4 address (NAT64 / DNS64 answers): judged by the address inside.
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]


class Refused(Exception):
    """A destination this server does not send to (not retried)."""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256 of f"{timestamp}.{body}" under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def not_public(ip: Address) -> str | None:
    """Why an address is not a public unicast one (None when it is). An IPv4 address carried
    inside IPv6 (mapped, 6to4, NAT64) is judged by itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if inner is not None:
            return not_public(inner)
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`host` is one of `allowed` (names or IP literals), or under a '*.example.com' entry."""
    host = host.lower().rstrip(".")
    for entry in (e.lower().rstrip(".") for e in allowed):
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def parse(url: str, cfg: WebhookConfig) -> httpx.URL:
    """A callback_url's form: absolute http(s) with a host name or IP, a valid port, no
    credentials (they would show in the job record), inside the allow-list -> the URL, or
    Refused saying why."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise Refused("contains spaces or control characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.host
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise Refused(f"not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise Refused("an absolute http:// or https:// URL with a host is required")
    if parsed.userinfo:
        raise Refused("credentials in the URL are not allowed (they would show in the job record); "
                      "authenticate deliveries by their signature")
    if not (parsed.port is None or 1 <= parsed.port <= 65535):
        raise Refused(f"port {parsed.port} is not a valid port")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME.fullmatch(parsed.raw_host.decode("ascii", "replace").lower()):
            raise Refused(f"{host!r} is not a valid host name") from None
    if cfg.allowed_hosts and not host_allowed(host, cfg.allowed_hosts):
        raise Refused(f"host {host} is not among the allowed webhook hosts (serving.webhooks.allowed_hosts)")
    return parsed


async def system_resolve(host: str, port: int) -> list[str]:
    """Every address of `host` (getaddrinfo, in a worker thread: the event loop goes on)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class Webhooks:
    """The ingress's webhook deliveries. `save(job)` writes a record after each attempt;
    `resolve(host, port)` lists a host's addresses (the system resolver; tests give their own)."""

    def __init__(self, cfg: WebhookConfig, save: Callable[[Queued], None], resolve: Resolve = system_resolve):
        self.cfg, self.save, self.resolve = cfg, save, resolve
        # Built once (loading the CA bundle takes a while); httpx's own default bundle.
        self.ssl_context = ssl.create_default_context(cafile=certifi.where())
        self.tasks: set[asyncio.Task] = set()  # running deliveries (kept referenced until they end)
        self._backlog: list[Job] = []  # ended where no event loop ran (start-up, a worker thread)
        self._loop: asyncio.AbstractEventLoop | None = None  # the ingress's, once seen

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.secret)

    async def address(self, url: httpx.URL) -> Address:
        """Resolve the URL's host and check every address it has -> the one to connect to, or
        Refused (an address not allowed) / OSError (no answer from the resolver)."""
        host = url.host
        try:
            addresses, named = [ipaddress.ip_address(host)], False
        except ValueError:
            port = url.port or (443 if url.scheme == "https" else 80)
            addresses, named = [ipaddress.ip_address(a) for a in await self.resolve(host, port)], True
            if not addresses:
                raise OSError(f"{host} has no address") from None
        if not self.cfg.allow_private:
            for ip in addresses:
                if (why := not_public(ip)) is not None:
                    where = f"{host} resolves to {ip}," if named else f"{ip} is"
                    raise Refused(f"{where} not a public address ({why}); this server sends webhooks to public "
                                  "addresses only (serving.webhooks.allow_private)")
        return addresses[0]

    async def check(self, callback_url: str | None) -> Webhook | None:
        """A request's callback_url, checked as it is submitted -> the job's webhook (None without
        one), or 422 naming callback_url."""
        if callback_url is None:
            return None
        if not self.enabled:
            raise ApiError(422, f"{PARAM}: completion webhooks are off on this server (no "
                                "serving.webhooks secret configured)", PARAM)
        try:
            url = parse(callback_url, self.cfg)
            async with asyncio.timeout(self.cfg.timeout_s):
                await self.address(url)
        except Refused as exc:
            raise ApiError(422, f"{PARAM}: {exc}", PARAM) from None
        except (OSError, TimeoutError, UnicodeError):
            raise ApiError(422, f"{PARAM}: the host {url.host!r} does not resolve", PARAM) from None
        return Webhook(url=str(url))

    # -------------------------------------------------------------- delivering

    def finished(self, record: Queued) -> None:
        """A record reached its final status: deliver its webhook, if it has one still pending.
        Called on the event loop, or from a worker thread (a sync method of the ingress, which
        Ray Serve runs in its thread pool): then handed to the loop."""
        if not (isinstance(record, Job) and record.webhook is not None and record.webhook.status == "pending"):
            return
        if not self._on_loop():
            if self._loop is not None and self._loop.is_running():
                self._loop.call_soon_threadsafe(self.finished, record)
            else:
                self._backlog.append(record)  # until flush() runs on a loop
            return
        task = self._loop.create_task(self.deliver(record))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def resume(self, jobs) -> None:
        """Jobs found at start-up that ended (or were interrupted) with their webhook pending:
        delivered now, or at the next `flush()` when no event loop runs yet."""
        self._on_loop()
        for job in jobs:
            if job.final:
                self.finished(job)

    def flush(self) -> None:
        """Start the deliveries held back for want of a running event loop (call it on the loop)."""
        if not self._on_loop():
            return
        backlog, self._backlog = self._backlog, []
        for job in backlog:
            self.finished(job)

    def _on_loop(self) -> bool:
        """Whether this runs on an event loop (remembered: the ingress has one)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    async def deliver(self, job: Job) -> None:
        """POST the job's record until an answer of 2xx, a final refusal, max_attempts or
        max_total_s. The body is the record as it was when the job ended (the webhook pending,
        no attempts), the same bytes on every attempt and after a restart."""
        cfg, hook = self.cfg, job.webhook
        body = job.model_copy(update={"webhook": Webhook(url=hook.url)}).model_dump_json().encode()
        deadline = time.monotonic() + cfg.max_total_s
        number, outcome = len(hook.attempts), ""
        while hook.status == "pending":
            number += 1
            attempt, retry = await self._attempt(job, hook, body, number)
            hook.attempts.append(attempt)
            outcome = f"HTTP {attempt.status_code}" if attempt.status_code is not None else attempt.error
            wait = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (number - 1)) * (1 + random.random() / 10)
            if attempt.status_code is not None and 200 <= attempt.status_code < 300:
                hook.status = "delivered"
            elif not retry or number >= cfg.max_attempts or time.monotonic() + wait > deadline:
                hook.status = "failed"
            self._save(job)
            if hook.status == "pending":
                log.info("webhook of %s: attempt %d: %s; again in %.1f s", job.id, number, outcome, wait)
                await asyncio.sleep(wait)
                if time.monotonic() > deadline:  # (a busy event loop overslept the wait)
                    hook.status = "failed"
                    self._save(job)
        log.log(logging.INFO if hook.status == "delivered" else logging.WARNING,
                "webhook of %s %s after %d attempt(s): %s", job.id, hook.status, number, outcome)

    def _save(self, job: Job) -> None:
        try:
            self.save(job)
        except OSError:  # (a full disk) the delivery goes on; the record catches up at the next save
            log.exception("webhook of %s: could not save the job's record", job.id)

    async def _attempt(self, job: Job, hook: Webhook, body: bytes, number: int) -> tuple[WebhookAttempt, bool]:
        """One POST -> (its record, whether a failure is worth retrying)."""
        at, started = time.time(), time.monotonic()
        status, error, retry = None, None, True
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                url = parse(hook.url, self.cfg)  # (the allow-list may have changed since submit)
                ip = await self.address(url)
                status = await self._post(url, ip, body, job, number)
            retry = status in (408, 429) or status >= 500
        except Refused as exc:
            error, retry = f"refused: {exc}", False
        except TimeoutError:
            error = f"no answer within {self.cfg.timeout_s:g} s"
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        return WebhookAttempt(at=round(at, 3), status_code=status, error=error,
                              duration_s=round(time.monotonic() - started, 3)), retry

    async def _post(self, url: httpx.URL, ip: Address, body: bytes, job: Job, number: int) -> int:
        """POST `body` to `url`'s host at the address `ip` (checked), signed now -> the status."""
        timestamp = int(time.time())
        headers = {"Host": url.netloc.decode("ascii"), "Content-Type": "application/json",
                   "User-Agent": USER_AGENT, f"{HEADER}Id": job.id, f"{HEADER}Attempt": str(number),
                   f"{HEADER}Event": f"video.{job.status}", f"{HEADER}Timestamp": str(timestamp),
                   f"{HEADER}Signature": signature(self.cfg.secret, timestamp, body)}
        # The connection goes to the checked address; TLS still verifies the certificate for the
        # host name (SNI), so a pinned address cannot be used to impersonate a host.
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        async with (httpx.AsyncClient(verify=self.ssl_context, trust_env=False, follow_redirects=False,
                                      timeout=self.cfg.timeout_s) as client,
                    client.stream("POST", url.copy_with(host=str(ip)), content=body, headers=headers,
                                  extensions=extensions) as response):
            return response.status_code  # the body is never read
