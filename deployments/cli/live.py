"""`avatar-serve live AVATAR --audio FILE --out FILE.mp4`: a live session from a file.

The file's speech is sent as a voice agent's TTS would send it: after `--lead-in` seconds of
idle, in `--chunk-ms` pieces of 16 kHz PCM at real-time pace, then `end_of_utterance`; the
session stays open `--tail` seconds after the speech ends (idle frames), then closes. Everything
the server streams back -- one fragmented MP4, idle and speech alike -- goes to the output file;
the session's events go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from deployments.cli.remote import _client


def cmd_live(args: argparse.Namespace) -> int:
    from deployments.media.audio import SAMPLE_RATE, decode_audio

    pcm = decode_audio(Path(args.audio).read_bytes())
    data = (pcm.clip(-1, 1) * 32767).astype("<i2").tobytes()
    chunk = max(1, int(SAMPLE_RATE * args.chunk_ms / 1000)) * 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = asyncio.run(_session(_client(args), args, data, chunk, out))
    print(json.dumps(summary), file=sys.stderr)
    return 0


async def _session(client, args, data: bytes, chunk: int, out: Path) -> dict:
    seconds = args.chunk_ms / 1000
    events: list[dict] = []
    written = 0
    async with client.live(args.avatar, "pcm_s16le", 16000) as session:
        print(json.dumps(session.ready), file=sys.stderr)

        async def talk():
            await asyncio.sleep(args.lead_in)
            for i in range(0, len(data), chunk):
                await session.send_audio(data[i:i + chunk])
                await asyncio.sleep(seconds)  # real-time pace, as a TTS stream arrives
            await session.end_of_utterance()

        speaking = asyncio.create_task(talk())
        ended_at = None
        with out.open("wb") as f:
            async for message in session:
                if isinstance(message, bytes):
                    f.write(message)
                    written += len(message)
                    continue
                if message.get("type") != "stats":
                    print(json.dumps(message), file=sys.stderr)
                events.append(message)
                if message.get("type") == "speech_ended" and ended_at is None:
                    ended_at = asyncio.get_running_loop().time()
                    asyncio.get_running_loop().call_later(args.tail, lambda: asyncio.ensure_future(session.close()))
        await speaking
    stats = [e for e in events if e.get("type") == "stats"]
    return {"output": str(out), "bytes": written, "last_stats": stats[-1] if stats else None}
