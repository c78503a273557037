"""Work that survives a restart of the ingress.

While a video job or an avatar preparation is unfinished, what it runs on is kept beside its
record (`inputs/<id>.npz` in the storage folder): the resolved parameters (the seed included, also
one the server chose), the decoded image and the admitted speech exactly as the stages get them,
and an avatar's face box. A rerun from them makes the same clip, byte for byte. The file goes
once the record is final (or deleted), so it exists only for queued and running work: at most
the queue's capacity of them, none counted in `max_result_bytes`.

A new ingress over the same storage calls `plan` before it serves: the records the old one left
unfinished are re-queued in the order they were submitted, up to `serving.requeue_max_jobs`, each
at most once more (`attempt` in the record); the rest fail with `interrupted` and a message that
says why. The ingress starts the re-queued work once its event loop runs (`Ingress.resume`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from deployments.api.jobs import Records
from deployments.api.protocol import JobError, Queued
from deployments.common.payloads import Speech, VideoParams

log = logging.getLogger("avatar_serve.requeue")

FORMAT = 1  # of the inputs file; a file of another format reads as unreadable

# Why a record left unfinished by a restart was not re-queued (the error code is `interrupted`).
TWICE = ("the server restarted while this job ran again after an earlier restart; it was re-queued once "
         "already, the most a job is")
LOST = "the server restarted before this job finished, and its saved inputs are missing or unreadable"
OFF = "the server restarted before this job finished (re-queuing is off: serving.requeue_max_jobs is 0)"
EXCESS = ("the server restarted before this job finished, and {n} jobs submitted before it took every "
          "re-queue place (serving.requeue_max_jobs)")


@dataclass(frozen=True)
class Inputs:
    """What a job or an avatar preparation runs on, as the stages get it."""

    params: VideoParams
    pixels: np.ndarray  # uint8 (H, W, 3), decoded from the upload
    audio: Speech | None = None
    face_box: tuple[int, int, int, int] | None = None
    queued_ns: int = dataclasses.field(default_factory=time.time_ns)  # submission time: the re-queue order


def dump(inputs: Inputs) -> bytes:
    """An .npz file of plain arrays (read back without pickle): the parameters as JSON bytes."""
    meta = {"format": FORMAT, "params": dataclasses.asdict(inputs.params), "queued_ns": inputs.queued_ns,
            "face_box": list(inputs.face_box) if inputs.face_box is not None else None}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), "pixels": inputs.pixels}
    if inputs.audio is not None:
        arrays["pcm"] = inputs.audio.pcm
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load(data: bytes) -> Inputs:
    """`dump`'s file back; ValueError (or another error of reading) when it is not one."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
        pixels = npz["pixels"]
        pcm = npz["pcm"] if "pcm" in npz.files else None
    if meta.get("format") != FORMAT:
        raise ValueError(f"inputs of format {meta.get('format')!r}, not {FORMAT}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image of {pixels.dtype} {pixels.shape}, not uint8 (H, W, 3)")
    if pcm is not None and (pcm.dtype != np.float32 or pcm.ndim != 1):
        raise ValueError(f"speech of {pcm.dtype} {pcm.shape}, not float32 (S,)")
    box = meta["face_box"]
    return Inputs(params=VideoParams(**meta["params"]), pixels=pixels, queued_ns=int(meta["queued_ns"]),
                  audio=Speech(pcm) if pcm is not None else None, face_box=tuple(box) if box else None)


async def keep(records: Records, record: Queued, inputs: Inputs) -> None:
    """Save what a queued record runs on (off the event loop), once its record is saved: a
    restart before this write ends fails it (inputs lost), and the client, still without an
    answer, sends it again. A failed write leaves the job running, only not restartable."""
    store = records.store
    try:
        await asyncio.to_thread(lambda: store.save_inputs(record.id, dump(inputs)))
    except OSError as exc:
        log.warning("%s: inputs not saved (%r); a restart will fail it", record.id, exc)
    if record.final or not records.knows(record):  # it ended, or went, during the write
        store.delete_inputs(record.id)


def plan(records: Records, max_records: int) -> list[tuple[Queued, Inputs]]:
    """Decide what becomes of every job and avatar an earlier ingress left queued or running:
    -> those to re-queue, oldest submission first (already saved as queued, `attempt` raised);
    the others are saved as failed with the reason. Inputs no re-queued record needs are deleted
    (a final record's, or a file whose record was never written)."""
    store = records.store
    unfinished = [r for r in (*records.jobs.values(), *records.avatars.values()) if not r.final]
    ready: list[tuple[Queued, Inputs]] = []
    for record in unfinished:
        if record.attempt > 1:
            _interrupted(records, record, TWICE)
            continue
        try:
            inputs = load(store.inputs_path(record.id).read_bytes())
        except Exception as exc:  # noqa: BLE001 - missing, torn or foreign: the job cannot run again
            log.warning("%s %s: inputs not usable (%r)", record.object, record.id, exc)
            _interrupted(records, record, LOST)
            continue
        ready.append((record, inputs))
    ready.sort(key=lambda pair: pair[1].queued_ns)
    kept, excess = ready[:max_records], ready[max_records:]
    for record, _ in excess:
        _interrupted(records, record, EXCESS.format(n=max_records) if max_records else OFF)
    for record, _ in kept:
        record.attempt += 1
        record.status, record.progress, record.stage, record.step, record.queue_position = "queued", 0, None, None, None
        store.save(record)
    keep = {record.id for record, _ in kept}
    for record_id in store.inputs_ids():
        if record_id not in keep:
            store.delete_inputs(record_id)
    if unfinished:
        log.info("after a restart: %d unfinished records, %d re-queued", len(unfinished), len(kept))
    return kept


def _interrupted(records: Records, record: Queued, message: str) -> None:
    record.status, record.completed_at, record.queue_position = "failed", int(time.time()), None
    record.error = JobError(code="interrupted", message=message)
    records.save(record)
