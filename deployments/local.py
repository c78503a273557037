"""The graph in one process, without Ray: same stage classes, same ingress, same calls.

`LocalHandle` gives a stage object the `handle.method.remote(...)` shape of a Ray Serve
`DeploymentHandle`: the call runs in a worker thread, and a response passed as an argument to a
later call is awaited first, as Ray resolves `DeploymentResponse` arguments. Tests use it to
check the ingress (and to count stage calls) in milliseconds; benchmarks use it to time stages.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from deployments.config import GraphConfig
from deployments.decoder import Decoder
from deployments.dit_expert import DitExpert
from deployments.encoder import Encoder
from deployments.ingress import Ingress


class LocalResponse:
    def __init__(self, fn, args: tuple, kwargs: dict):
        self._task = asyncio.ensure_future(self._run(fn, args, kwargs))

    @staticmethod
    async def _run(fn, args, kwargs):
        args = [await a if isinstance(a, LocalResponse) else a for a in args]
        kwargs = {k: await v if isinstance(v, LocalResponse) else v for k, v in kwargs.items()}
        return await asyncio.to_thread(fn, *args, **kwargs)

    def __await__(self):
        return self._task.__await__()


class _Method:
    def __init__(self, handle: "LocalHandle", name: str):
        self._handle, self._name = handle, name

    def remote(self, *args, **kwargs) -> LocalResponse:
        self._handle.calls[self._name] += 1
        return LocalResponse(getattr(self._handle.target, self._name), args, kwargs)


class LocalHandle:
    """Wraps a stage object; `calls` counts method calls by name."""

    def __init__(self, target: Any):
        self.target = target
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)


class LocalGraph:
    """Every stage of `cfg` built in this process, behind an `Ingress`."""

    def __init__(self, cfg: GraphConfig):
        s = cfg.stages
        self.encoder = LocalHandle(Encoder(s.encoder))
        self.high = LocalHandle(DitExpert(s.high, cfg.sampler))
        self.low = LocalHandle(DitExpert(s.low, cfg.sampler))
        self.decoder = LocalHandle(Decoder(s.decoder))
        self.ingress = Ingress(self.encoder, self.high, self.low, self.decoder, cfg)

    @property
    def stage_calls(self) -> int:
        return sum(sum(h.calls.values()) for h in (self.encoder, self.high, self.low, self.decoder))
