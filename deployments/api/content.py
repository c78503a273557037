"""A video job's MP4 while it is made: the decoder streams a fragmented MP4 as the VAE decodes
(deployments/decoder.py), and the ingress hands each piece to whoever follows the job's content
(`GET /v1/videos/{id}/stream`) at once; the finished file is the pieces joined, byte for byte.

    decoder.decode_fmp4 --pieces--> streamed_mp4 --on_piece--> GrowingContent --follow()--> clients
                                                 \\--the whole file--> the job's result
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from deployments.api.queue import dispatched
from deployments.api.retry import StageRetries


class GrowingContent:
    """A running job's MP4 pieces, in memory (a clip is a few hundred kB) until the job ends; any
    number of followers read them from the first as they come. Lives on the ingress's event loop."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.ended = False
        self._changed = asyncio.Event()

    def append(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self._wake()

    def end(self) -> None:
        """No more pieces (the job completed, failed or was cancelled)."""
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[bytes]:
        """Every piece from the first, then each new one as it comes, until the end. A job that
        fails part-way ends its stream early; its record and events say why."""
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.pieces):
                sent += 1
                yield self.pieces[sent - 1]
            if self.ended:
                return
            await changed.wait()


async def streamed_mp4(decoder, state, calls: list, retries: StageRetries, on_piece: Callable[[bytes], None]) -> bytes:
    """The decoder's fMP4 stream -> the whole file, each new piece handed to `on_piece` as it
    arrives. A decode run again after its replica died makes the same bytes again: the ones already
    handed on are checked equal and skipped, so followers see one file."""
    data = bytearray()

    async def attempt() -> bytes:
        done = 0
        stream = dispatched(calls, decoder.options(stream=True).decode_fmp4.remote(state))
        async for piece in stream:
            seen = bytes(data[done:done + len(piece)])  # what an earlier attempt already handed on
            if piece[:len(seen)] != seen:
                raise RuntimeError("the decode run again made other bytes than the first time")
            done += len(piece)
            if len(seen) < len(piece):
                data.extend(piece[len(seen):])
                on_piece(piece[len(seen):])
        if done < len(data):
            raise RuntimeError("the decode run again made a shorter file than the first time")
        return bytes(data)

    return await retries.call("decoder", attempt)
