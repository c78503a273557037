"""A dead replica costs one stage, not the job.

The ingress keeps each finished stage's output of a running job until the job ends: the encoder's
conditioning (a response it passed to both experts, held in Ray's object store, which outlives
the replica that made it) and the latents after the high expert (they come back through the
ingress anyway). When a stage's replica dies mid-job, that stage runs once more -- Serve's router
drops the dead replica and sends the call to the restarted or another one -- from the kept input.
The stages are deterministic (the seed makes the noise; no step draws new noise), so the clip is
byte-identical to an undisturbed run.

Ray Serve reports a dead replica two ways: the called replica's own death (an `ActorDiedError`,
a `RayActorError`), or, for a call that was given another stage's response, the death of that
stage's replica (a `RayServeException` caused by an `ActorDiedError`). The second is the other
stage's to retry; `failed` tells which (tests/api/test_retry.py).
"""

from __future__ import annotations

import logging
from collections import Counter

from deployments.api.jobs import _replica_gone
from deployments.common.errors import unwrap

log = logging.getLogger("avatar_serve.retry")


def replica_gone(exc: BaseException) -> bool:
    """A stage's replica died: the called one, or one whose output the call was given."""
    return _replica_gone(exc) or (exc.__cause__ is not None and _replica_gone(exc.__cause__))


async def failed(response) -> bool:
    """Whether a stage call (a response passed on to a later stage) failed because its replica
    died. Awaiting a response that succeeded fetches its result: done on failure paths only."""
    try:
        await response
    except Exception as exc:  # noqa: BLE001 - any failure of it; only a dead replica counts
        return replica_gone(exc)
    return False


class StageRetries:
    """The retries left to one job: `limit` per stage (`serving.stage_retries`)."""

    def __init__(self, job_id: str, progress, limit: int = 1):
        self.job_id, self.progress, self.limit = job_id, progress, limit
        self.used: Counter[str] = Counter()

    def allow(self, stage: str, exc: BaseException) -> bool:
        """Whether `stage` may run again after `exc`: only when a replica died and the stage has
        retries left. Called in an `except` block, which re-raises when this says no."""
        if not replica_gone(exc) or self.used[stage] >= self.limit:
            return False
        self.used[stage] += 1
        log.warning("%s: the %s stage's replica died (%s); running the stage again from its kept input",
                    self.job_id, stage, type(unwrap(exc)).__name__)
        self.progress.retry(stage, f"the {stage} stage's replica died; it runs again from its kept input")
        return True

    async def call(self, stage: str, make):
        """`await make()`, made again when `stage`'s replica died (within the limit)."""
        while True:
            try:
                return await make()
            except Exception as exc:
                if not self.allow(stage, exc):
                    raise
