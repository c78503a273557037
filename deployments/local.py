"""The graph in one process, without Ray: same stage classes, same ingress, same calls.

`LocalHandle` gives a stage object the `handle.method.remote(...)` shape of a Ray Serve
`DeploymentHandle`: the call runs in a worker thread, and a response passed as an argument to a
later call is awaited first, as Ray resolves `DeploymentResponse` arguments. Tests use it to
check the ingress (and to count stage calls) in milliseconds; benchmarks use it to time stages.
`serve_in_thread` puts its app (or any ASGI app) on a real socket, for clients that need one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable

from deployments.config import GraphConfig
from deployments.decoder import Decoder
from deployments.dit_expert import DitExpert
from deployments.encoder import Encoder
from deployments.ingress import Ingress
from deployments.lipsync import LipSync


async def _resolve(args: tuple, kwargs: dict) -> tuple[list, dict]:
    args = [await a if isinstance(a, LocalResponse) else a for a in args]
    kwargs = {k: await v if isinstance(v, LocalResponse) else v for k, v in kwargs.items()}
    return args, kwargs


class LocalResponse:
    """Like `DeploymentResponse`: awaitable; sync methods run in a worker thread."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        self._task = asyncio.ensure_future(self._run(fn, args, kwargs))

    @staticmethod
    async def _run(fn, args, kwargs):
        args, kwargs = await _resolve(args, kwargs)
        if asyncio.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def cancel(self) -> None:
        self._task.cancel()

    def __await__(self):
        return self._task.__await__()


_DONE = object()


class LocalStream:
    """Like `DeploymentResponseGenerator` (`handle.options(stream=True)`): an async iterator
    over what an (async) generator method yields; `cancel()` stops it."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._gen = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._gen is None:
            args, kwargs = await _resolve(self._args, self._kwargs)
            self._gen = self._fn(*args, **kwargs)
        if hasattr(self._gen, "__anext__"):
            return await self._gen.__anext__()
        # A sync generator (e.g. LipSync.speak): each item is computed in a worker thread.
        item = await asyncio.to_thread(next, self._gen, _DONE)
        if item is _DONE:
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        if self._gen is None:
            return
        if hasattr(self._gen, "aclose"):
            asyncio.ensure_future(self._gen.aclose())
        else:
            self._gen.close()


class _Method:
    def __init__(self, handle: "LocalHandle", name: str, stream: bool):
        self._handle, self._name, self._stream = handle, name, stream

    def remote(self, *args, **kwargs):
        self._handle.calls[self._name] += 1
        fn = getattr(self._handle.target, self._name)
        return (LocalStream if self._stream else LocalResponse)(fn, args, kwargs)


class LocalHandle:
    """Wraps a stage object; `calls` counts method calls by name."""

    def __init__(self, target: Any, calls: Counter | None = None, stream: bool = False):
        self.target = target
        self.calls: Counter[str] = Counter() if calls is None else calls
        self._stream = stream

    def options(self, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self.target, self.calls, stream)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name, self._stream)


class LocalGraph:
    """Every stage of `cfg` built in this process, behind an `Ingress`."""

    def __init__(self, cfg: GraphConfig):
        def stage(cls: type, key: str) -> LocalHandle:  # built as graph.py binds them
            return LocalHandle(cls(getattr(cfg.stages, key), **cfg.stage_arguments(key)))

        self.encoder = stage(Encoder, "encoder")
        self.high = stage(DitExpert, "high")
        self.low = stage(DitExpert, "low")
        self.decoder = stage(Decoder, "decoder")
        self.lipsync = stage(LipSync, "lipsync")
        self.ingress = Ingress(self.encoder, self.high, self.low, self.decoder, cfg, self.lipsync)

    def app(self):
        """The HTTP app over this graph's ingress (FastAPI; tests drive it with TestClient)."""
        from deployments.api.routes import build_app

        return build_app(self.ingress)

    @property
    def stage_calls(self) -> int:
        return sum(sum(h.calls.values()) for h in (self.encoder, self.high, self.low, self.decoder, self.lipsync))


def serve_in_thread(app, host: str = "127.0.0.1") -> tuple[str, Callable[[], None]]:
    """An ASGI app (e.g. `LocalGraph(cfg).app()`) under uvicorn in a daemon thread on a free
    port -> (base URL, stop()). For clients that need a real socket: trickled bodies, held
    connections, subprocesses."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(10)

    return f"http://{host}:{port}", stop
