"""Completion webhooks (deployments/api/webhooks.py) on the in-process graph: real tiny jobs end,
their records reach a receiver on 127.0.0.1 (a threaded http.server), signed as the README says
(its verification snippet checks them), retried, every attempt kept and persisted; destinations
are checked when a job is submitted (422 naming callback_url) and again before each attempt, and
the request goes to the address checked. A resolver given to the ingress stands in for DNS where a
test needs a name to point somewhere chosen (no network here)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.api.jobs import JobStore
from deployments.api.protocol import ApiError, Job, Webhook
from deployments.api.webhooks import host_allowed, not_public, signature
from deployments.local import LocalGraph
from deployments.profiles import load_profile
from helpers import HANG_S, get_dummy_image, png_bytes, wait_final

SECRET = "test-webhook-secret-0123456789"
IMAGE = png_bytes(get_dummy_image())
REQUEST = {"prompt": "a man smiles", "size": "16x16", "num_frames": 5, "num_inference_steps": 2}
PUBLIC = "93.184.216.34"
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SNIPPET = next(b for b in re.findall(r"^```python\n(.*?)^```", README, re.MULTILINE | re.DOTALL) if "def verify" in b)


def readme_verify():
    namespace: dict = {}
    exec(SNIPPET, namespace)  # noqa: S102 - the receiver's code exactly as the README gives it
    return namespace["verify"]


# ------------------------------------------------------------------ a receiver


class Receiver:
    """Webhook receiver on 127.0.0.1: keeps each request (headers, body); answers with the next
    of `answers` (the last repeats) after the next of `delays` seconds (default none); while
    `hold` is given and unset, the first request waits for it."""

    def __init__(self, answers=(200,), delays=(), hold: threading.Event | None = None, tls=None):
        self.answers, self.delays, self.hold = list(answers), list(delays), hold
        self.requests: list[tuple] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                index = len(receiver.requests)
                receiver.requests.append((self.headers, body))
                if index == 0 and receiver.hold is not None:
                    receiver.hold.wait(HANG_S)
                if index < len(receiver.delays):
                    time.sleep(receiver.delays[index])
                self.send_response(receiver.answers[min(index, len(receiver.answers) - 1)])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}/hooks/video?tenant=7"

    def close(self):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receivers():
    made = []

    def make(*args, **kwargs) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def names(table: dict[str, list[str]]):
    """A resolver over `table` (name -> addresses; a list of lists answers each call in turn,
    the last repeating); other names do not resolve."""
    calls: dict[str, int] = {}

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"no such host {host}")
        answers = table[host]
        if answers and isinstance(answers[0], list):
            i = calls[host] = calls.get(host, -1) + 1
            return answers[min(i, len(answers) - 1)]
        return answers

    return resolve


def build(tmp_path, resolve=None, stages=None, serving=None, **webhooks) -> LocalGraph:
    hooks = {"secret": SECRET, "allow_private": True, "backoff_s": 0.02, "max_backoff_s": 0.1, "timeout_s": 5,
             **webhooks}
    graph = LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path), "webhooks": hooks,
                                                         **(serving or {})}, "stages": stages or {}}))
    if resolve is not None:
        graph.ingress.webhooks.resolve = resolve
    return graph


async def ended(job: Job) -> Webhook:
    """The job's webhook once its delivery has finished (delivered or failed)."""
    deadline = time.monotonic() + HANG_S
    while job.webhook.status == "pending":
        assert time.monotonic() < deadline, job.webhook
        await asyncio.sleep(0.02)
    return job.webhook


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------ delivery


def test_a_finished_job_posts_its_record_signed_and_get_shows_the_delivery(tmp_path, receivers):
    receiver = receivers()
    graph = build(tmp_path)
    with TestClient(graph.app()) as client:
        job = client.post("/v1/videos", data={**REQUEST, "callback_url": receiver.url()},
                          files={"input_reference": ("p.png", IMAGE, "image/png")}).json()
        assert job["webhook"] == {"url": receiver.url(), "status": "pending", "attempts": []}
        final = wait_final(client, job["id"])
        deadline = time.monotonic() + HANG_S
        while (record := client.get(f"/v1/videos/{job['id']}").json())["webhook"]["status"] == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert final["status"] == "completed"
    hook = record["webhook"]
    assert hook["status"] == "delivered" and [a["status_code"] for a in hook["attempts"]] == [200]
    assert hook["attempts"][0]["error"] is None and hook["attempts"][0]["duration_s"] >= 0
    (headers, body), = receiver.requests
    delivered = readme_verify()(SECRET, headers, body)
    # The record as GET showed it at the end: everything but the delivery's own progress.
    assert delivered == {**record, "webhook": {"url": receiver.url(), "status": "pending", "attempts": []}}
    assert headers["X-Avatar-Serve-Id"] == job["id"] and headers["X-Avatar-Serve-Attempt"] == "1"
    assert headers["X-Avatar-Serve-Event"] == "video.completed"
    assert headers["Content-Type"] == "application/json" and headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert abs(int(headers["X-Avatar-Serve-Timestamp"]) - time.time()) < HANG_S
    with pytest.raises(ValueError, match="bad signature"):
        readme_verify()("another-secret-0123456789", headers, body)
    with pytest.raises(ValueError, match="bad signature"):
        readme_verify()(SECRET, headers, body.replace(b"completed", b"failed!!!"))
    stale = {**dict(headers.items()), "X-Avatar-Serve-Timestamp": str(int(time.time()) - 3600)}
    stale["X-Avatar-Serve-Signature"] = signature(SECRET, int(stale["X-Avatar-Serve-Timestamp"]), body)
    with pytest.raises(ValueError, match="stale"):
        readme_verify()(SECRET, stale, body)
    # Persisted: the record on disk has every attempt.
    stored = Job.model_validate_json((tmp_path / "jobs" / f"{job['id']}.json").read_bytes())
    assert stored.webhook.model_dump() == hook


def test_a_500_is_retried_then_delivered_with_the_same_body_and_each_attempt_kept(tmp_path, receivers):
    receiver = receivers(answers=(500, 502, 200))

    async def main():
        graph = build(tmp_path)
        job = await graph.ingress.submit({**REQUEST, "callback_url": receiver.url()}, IMAGE)
        return job, await ended(job)

    job, hook = run(main())
    assert hook.status == "delivered" and [a.status_code for a in hook.attempts] == [500, 502, 200]
    assert [h["X-Avatar-Serve-Attempt"] for h, _ in receiver.requests] == ["1", "2", "3"]
    assert len({body for _, body in receiver.requests}) == 1  # the same bytes every time
    verify = readme_verify()
    assert all(verify(SECRET, h, b)["id"] == job.id for h, b in receiver.requests)
    starts = [a.at for a in hook.attempts]
    assert starts == sorted(starts) and starts[2] - starts[0] >= 0.02 + 0.04  # backed off: 0.02 s, then 0.04 s
    stored = JobStore(tmp_path).recover()
    assert [j.webhook.model_dump() for j in stored if j.id == job.id] == [hook.model_dump()]


@pytest.mark.parametrize("answers,codes,status", [
    ((404,), [404], "failed"),  # a client error is final
    ((301,), [301], "failed"),  # redirects are not followed
    ((429, 408, 204), [429, 408, 204], "delivered"),  # "slow down" and "too slow" are retried
    ((503,), [503, 503, 503], "failed"),  # max_attempts: 3
])
def test_which_answers_are_retried(tmp_path, receivers, answers, codes, status):
    receiver = receivers(answers=answers)

    async def main():
        job = await build(tmp_path, max_attempts=3).ingress.submit({**REQUEST, "callback_url": receiver.url()}, IMAGE)
        return await ended(job)

    hook = run(main())
    assert hook.status == status and [a.status_code for a in hook.attempts] == codes
    assert len(receiver.requests) == len(codes)


def test_no_attempt_starts_past_max_total_s(tmp_path, receivers):
    receivers_ = receivers(answers=(500,))

    async def main():
        graph = build(tmp_path, max_attempts=20, backoff_s=0.1, max_backoff_s=10, max_total_s=2.0)
        job = await graph.ingress.submit({**REQUEST, "callback_url": receivers_.url()}, IMAGE)
        return await ended(job)

    hook = run(main())
    # Waits of 0.1, 0.2, 0.4, 0.8 s: about five attempts fit, not twenty (fewer on a busy machine).
    assert hook.status == "failed" and 2 <= len(hook.attempts) < 20, hook
    assert hook.attempts[-1].at - hook.attempts[0].at <= 2.0


def test_a_receiver_slower_than_timeout_s_counts_as_a_failed_attempt(tmp_path, receivers):
    receiver = receivers(answers=(200,), delays=(2.0,))

    async def main():
        job = await build(tmp_path, timeout_s=0.3).ingress.submit({**REQUEST, "callback_url": receiver.url()}, IMAGE)
        return await ended(job)

    hook = run(main())
    assert hook.status == "delivered" and len(hook.attempts) == 2, hook
    assert hook.attempts[0].status_code is None and hook.attempts[0].error == "no answer within 0.3 s"
    assert hook.attempts[0].duration_s < 2.0 and hook.attempts[1].status_code == 200


def test_an_unreachable_receiver_is_retried_and_recorded(tmp_path, receivers):
    receiver = receivers()
    receiver.close()  # nothing listens on its port any more

    async def main():
        job = await build(tmp_path, max_attempts=2).ingress.submit({**REQUEST, "callback_url": receiver.url()}, IMAGE)
        return await ended(job)

    hook = run(main())
    assert hook.status == "failed" and len(hook.attempts) == 2
    assert all(a.status_code is None and a.error.startswith("ConnectError") for a in hook.attempts), hook


def test_a_cancelled_job_is_delivered_as_cancelled(tmp_path, receivers):
    receiver = receivers()

    async def main():
        graph = build(tmp_path, stages={r: {"simulate_step_seconds": 0.2} for r in ("high", "low")})
        job = await graph.ingress.submit({**REQUEST, "num_inference_steps": 20, "callback_url": receiver.url()},
                                         IMAGE)
        await asyncio.sleep(0.3)
        graph.ingress.cancel_or_delete(job.id)
        return await ended(job)

    assert run(main()).status == "delivered"
    (headers, body), = receiver.requests
    assert headers["X-Avatar-Serve-Event"] == "video.cancelled"
    assert readme_verify()(SECRET, headers, body)["status"] == "cancelled"


def test_without_callback_url_nothing_is_sent(tmp_path, receivers):
    receiver = receivers()

    async def main():
        graph = build(tmp_path)
        job = await graph.ingress.submit(REQUEST, IMAGE)
        while not job.final:
            await asyncio.sleep(0.02)
        return graph, job

    graph, job = run(main())
    assert job.status == "completed" and job.webhook is None and not graph.ingress.webhooks.tasks
    assert json.loads(job.model_dump_json())["webhook"] is None and receiver.requests == []


def test_a_delivery_pending_at_a_restart_is_made_by_the_next_ingress(tmp_path, receivers):
    """A job that was running when the ingress stopped is marked failed (interrupted) at the next
    start, and its webhook says so; the ingress may be built before any event loop runs (its
    deliveries start with the first call on one)."""
    receiver = receivers()
    store = JobStore(tmp_path)
    job = Job(id="video_restarted", status="in_progress", created_at=int(time.time()), model="tiny", prompt="p",
              size="16x16", num_frames=5, seed=1, seconds="0.3", fps=16, num_inference_steps=2,
              webhook=Webhook(url=receiver.url()))
    store.save(job)
    graph = build(tmp_path)  # outside any event loop

    async def main():
        await graph.ingress.ready()
        return await ended(graph.ingress.job(job.id))

    assert run(main()).status == "delivered"
    (headers, body), = receiver.requests
    record = readme_verify()(SECRET, headers, body)
    assert headers["X-Avatar-Serve-Event"] == "video.failed" and record["error"]["code"] == "interrupted"


def test_a_job_ended_in_a_worker_thread_is_delivered_from_the_event_loop(tmp_path, receivers):
    """Ray Serve runs the ingress's sync methods (cancel_or_delete) in a thread pool: a job that
    ends there has its delivery handed to the ingress's loop."""
    receiver = receivers()

    async def main():
        graph = build(tmp_path)  # built on the loop, as Ray Serve builds a replica
        job = Job(id="video_threaded", status="cancelled", created_at=int(time.time()), model="tiny", prompt="p",
                  size="16x16", num_frames=5, seed=1, seconds="0.3", fps=16, num_inference_steps=2,
                  webhook=Webhook(url=receiver.url()))
        await asyncio.to_thread(graph.ingress.webhooks.finished, job)
        return await ended(job)

    assert run(main()).status == "delivered" and len(receiver.requests) == 1


def test_a_slow_receiver_holds_up_neither_requests_nor_the_queue(tmp_path, receivers):
    hold = threading.Event()
    receiver = receivers(hold=hold)
    graph = build(tmp_path, serving={"max_running_jobs": 1})
    files = {"input_reference": ("p.png", IMAGE, "image/png")}
    with TestClient(graph.app()) as client:
        first = client.post("/v1/videos", data={**REQUEST, "callback_url": receiver.url()}, files=files).json()
        assert wait_final(client, first["id"])["status"] == "completed"
        deadline = time.monotonic() + HANG_S
        while not receiver.requests:  # the receiver has the delivery and does not answer
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/healthz").status_code == 200
        second = client.post("/v1/videos", data=REQUEST, files=files).json()
        assert wait_final(client, second["id"])["status"] == "completed"  # the single running slot is free
        assert client.get(f"/v1/videos/{first['id']}").json()["webhook"]["status"] == "pending"
        hold.set()
        while client.get(f"/v1/videos/{first['id']}").json()["webhook"]["status"] == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get(f"/v1/videos/{first['id']}").json()["webhook"]["status"] == "delivered"


# ------------------------------------------------------------------ destinations


def test_delivery_goes_to_the_checked_address_with_the_host_named(tmp_path, receivers):
    """`hooks.test` exists only for the ingress's resolver: the delivery reaching the receiver
    shows the connection went to the address checked, not to a second lookup."""
    receiver = receivers()

    async def main():
        graph = build(tmp_path, names({"hooks.test": ["127.0.0.1"]}), allowed_hosts=["*.test"])
        job = await graph.ingress.submit({**REQUEST, "callback_url": receiver.url("hooks.test")}, IMAGE)
        return await ended(job)

    assert run(main()).status == "delivered"
    (headers, _), = receiver.requests
    assert headers["Host"] == f"hooks.test:{receiver.port}"


def test_a_name_that_turns_private_after_submit_is_not_delivered_to(tmp_path, receivers):
    """DNS rebinding: public when the job is submitted, loopback when it is delivered. The
    receiver listens there, so a delivery that did not check again would reach it."""
    receiver = receivers()

    async def main():
        resolve = names({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
        graph = build(tmp_path, resolve, allow_private=False)
        job = await graph.ingress.submit({**REQUEST, "callback_url": receiver.url("rebind.test")}, IMAGE)
        return await ended(job)

    hook = run(main())
    assert hook.status == "failed" and len(hook.attempts) == 1  # a refusal is not retried
    assert hook.attempts[0].error.startswith("refused: rebind.test resolves to 127.0.0.1, not a public address (loopback)"), hook
    assert receiver.requests == []


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A graph with webhooks on, public destinations only (refusals change nothing: one serves all)."""
    return build(tmp_path_factory.mktemp("strict"), RESOLVER, allow_private=False)


RESOLVER = names({"public.test": [PUBLIC], "inside.test": ["192.168.1.10"], "mixed.test": [PUBLIC, "10.0.0.1"],
                  "v6.test": ["::1"]})


@pytest.mark.parametrize("url,words", [
    ("http://127.0.0.1:8000/hook", "127.0.0.1 is not a public address (loopback)"),
    ("http://[::1]/hook", "::1 is not a public address (loopback)"),
    ("http://[::ffff:10.0.0.1]/", "(private)"),
    ("http://[2002:7f00:1::]/", "(loopback)"),  # 6to4 around 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "(link-local)"),  # NAT64 around 169.254.169.254
    ("http://169.254.169.254/latest/meta-data/", "(link-local)"),
    ("http://224.0.0.1/", "(multicast)"),
    ("http://0.0.0.0/", "0.0.0.0"),
    ("http://100.64.0.1/", "(not globally routable)"),  # carrier-grade NAT
    ("http://inside.test/", "inside.test resolves to 192.168.1.10, not a public address (private)"),
    ("http://mixed.test/", "mixed.test resolves to 10.0.0.1, not a public address (private)"),  # every address counts
    ("http://v6.test/", "(loopback)"),
    ("http://nowhere.test/", "does not resolve"),
    ("ftp://public.test/x", "http:// or https://"),
    ("javascript:alert(1)", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("not a url", "spaces"),
    ("/relative/path", "http:// or https://"),
    ("http://", "http:// or https://"),
    ("http://user:secret@public.test/", "credentials"),
    ("http://public.test:99999/", "port 99999"),
    ("http://public.test/a\nb", "control characters"),
    ("http://bad%20host.test/", "not a valid host name"),
    ("https://public.test/" + "a" * 2100, "at most 2048 characters"),
])
def test_a_destination_not_allowed_is_refused_at_submit_naming_callback_url(strict, url, words):
    graph = strict
    calls = graph.stage_calls
    with pytest.raises(ApiError) as caught:
        run(graph.ingress.submit({**REQUEST, "callback_url": url}, IMAGE))
    error = caught.value
    assert (error.status, error.param) == (422, "callback_url") and words in error.message, error.message
    assert graph.stage_calls == calls and not graph.ingress.records.jobs


def test_allowed_hosts_and_allow_private(tmp_path):
    async def submit(graph, url):
        return (await graph.ingress.submit({**REQUEST, "callback_url": url}, IMAGE)).webhook.url

    graph = build(tmp_path / "a", RESOLVER, allow_private=False, allowed_hosts=["public.test", "*.hooks.test"])
    assert run(submit(graph, "https://public.test/x")) == "https://public.test/x"
    with pytest.raises(ApiError, match="not among the allowed webhook hosts"):
        run(submit(graph, "https://inside.test/x"))
    # allow_private opens private addresses, still inside the allow-list
    graph = build(tmp_path / "b", RESOLVER, allow_private=True, allowed_hosts=["inside.test"])
    assert run(submit(graph, "http://inside.test/")) == "http://inside.test/"
    with pytest.raises(ApiError, match="not among"):
        run(submit(graph, "http://public.test/"))


def test_host_allowed_matches_names_and_subdomains_only():
    allowed = ["hooks.example.com", "*.example.net", "10.1.2.3"]
    assert host_allowed("HOOKS.example.com.", allowed) and host_allowed("a.b.example.net", allowed)
    assert host_allowed("10.1.2.3", allowed)
    for host in ("example.net", "evil-example.net", "example.net.evil.org", "hooks.example.com.evil.org",
                 "xhooks.example.com", "10.1.2.30"):
        assert not host_allowed(host, allowed), host


@pytest.mark.parametrize("address,why", [
    ("8.8.8.8", None), ("2606:4700::1111", None), ("127.0.0.2", "loopback"), ("10.1.1.1", "private"),
    ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"), ("fc00::1", "private"), ("ff02::1", "multicast"), ("239.1.1.1", "multicast"),
    ("::", "unspecified"), ("::ffff:8.8.8.8", None), ("::ffff:192.168.0.1", "private"),
    ("2002:0808:0808::", None), ("64:ff9b::808:808", None), ("240.0.0.1", "reserved"),
    ("100.64.0.1", "not globally routable"),
])
def test_which_addresses_are_public(address, why):
    assert not_public(ipaddress.ip_address(address)) == why


def test_webhooks_are_off_without_a_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_SERVE_WEBHOOK_SECRET", raising=False)
    graph = LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path)}}))
    with pytest.raises(ApiError, match="webhooks are off") as caught:
        run(graph.ingress.submit({**REQUEST, "callback_url": "https://hooks.example.com/x"}, IMAGE))
    assert caught.value.param == "callback_url"
    assert run(graph.ingress.submit(REQUEST, IMAGE)).webhook is None  # a job without one is as before


def test_only_video_jobs_take_a_callback_url(tmp_path):
    graph = build(tmp_path)
    with TestClient(graph.app()) as client:
        files = {"input_reference": ("p.png", IMAGE, "image/png")}
        for path in ("/v1/videos/sync", "/v1/avatars"):
            r = client.post(path, data={**REQUEST, "callback_url": "http://127.0.0.1:9/x"}, files=files)
            assert r.status_code == 422 and r.json()["error"]["param"] == "callback_url", (path, r.text)
    assert graph.stage_calls == 0


# ------------------------------------------------------------------ https


def tls_files(tmp_path, host: str) -> tuple[ssl.SSLContext, str]:
    """A test CA and a certificate it signs for `host` -> (the server's context, the CA in PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, "test CA", ca_key, True)
    leaf = cert(host, key, "test CA", ca_key, False)
    (tmp_path / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, ca.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("cert_for,status", [("hooks.test", "delivered"), ("other.test", "failed")])
def test_https_checks_the_certificate_for_the_host_while_connecting_to_the_checked_address(
        tmp_path, receivers, cert_for, status):
    server_tls, ca = tls_files(tmp_path, cert_for)
    receiver = receivers(tls=server_tls)

    async def main():
        graph = build(tmp_path / "store", names({"hooks.test": ["127.0.0.1"]}), max_attempts=1)
        graph.ingress.webhooks.ssl_context = ssl.create_default_context(cadata=ca)
        job = await graph.ingress.submit({**REQUEST, "callback_url": receiver.url("hooks.test", "https")}, IMAGE)
        return await ended(job)

    hook = run(main())
    assert hook.status == status, hook
    if status == "failed":  # a certificate for another name is refused, so nothing was posted
        assert "certificate" in hook.attempts[0].error.lower() and receiver.requests == []
    else:
        (headers, _), = receiver.requests
        assert headers["Host"] == f"hooks.test:{receiver.port}"


# ------------------------------------------------------------------ the secret


def test_the_secret_comes_from_the_profile_the_variable_or_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_SERVE_WEBHOOK_SECRET", raising=False)
    assert load_profile("tiny").serving.webhooks.secret is None
    monkeypatch.setenv("AVATAR_SERVE_WEBHOOK_SECRET", SECRET)
    cfg = load_profile("tiny")
    assert cfg.serving.webhooks.secret == SECRET and SECRET not in repr(cfg.serving)
    monkeypatch.delenv("AVATAR_SERVE_WEBHOOK_SECRET")
    path = tmp_path / "secret"
    path.write_text(f"# the webhook secret\n{SECRET}\n")
    assert load_profile("tiny", {"serving": {"webhooks": {"secret_file": str(path)}}}).serving.webhooks.secret == SECRET
    monkeypatch.setenv("MY_HOOK_SECRET", SECRET)
    cfg = load_profile("tiny", {"serving": {"webhooks": {"secret_env": "MY_HOOK_SECRET", "secret": SECRET}}})
    assert cfg.serving.webhooks.secret == SECRET  # the same secret twice is no conflict


@pytest.mark.parametrize("env,webhooks,words", [
    ("   ", {}, "AVATAR_SERVE_WEBHOOK_SECRET is set but blank"),
    (None, {"secret_file": "/nonexistent/secret"}, "cannot be read"),
    (None, {"secret_file": "EMPTY"}, "holds no secret"),
    (SECRET, {"secret": "another-secret-0123456789"}, "different webhook secrets"),
    (None, {"secret": "short"}, "at least 16 characters"),
])
def test_a_secret_source_that_gives_nothing_usable_stops_start_up(tmp_path, monkeypatch, env, webhooks, words):
    monkeypatch.delenv("AVATAR_SERVE_WEBHOOK_SECRET", raising=False)
    if env is not None:
        monkeypatch.setenv("AVATAR_SERVE_WEBHOOK_SECRET", env)
    if webhooks.get("secret_file") == "EMPTY":
        (tmp_path / "empty").write_text("# nothing here\n\n")
        webhooks = {"secret_file": str(tmp_path / "empty")}
    with pytest.raises((ValueError, ValidationError), match=words):
        load_profile("tiny", {"serving": {"webhooks": webhooks}})
