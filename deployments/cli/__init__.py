"""`avatar-serve` command line: the argument parser and the dispatch to each command.

    avatar-serve demo [--profile tiny] [-o out/demo.mp4]
        start a local Ray cluster, deploy the graph, and over HTTP: a video job from a generated
        portrait (out/demo.mp4), then an avatar from the same portrait and a lip-synced talk turn
        from generated speech-like audio (out/demo-talk.mp4); shut down.
    avatar-serve download PROFILE [--dry-run]
    avatar-serve generate IMAGE PROMPT [--audio FILE] [-o out.mp4]     (a running server)
    avatar-serve speak AUDIO (--avatar ID | --image IMAGE --prompt TEXT) [-o speech.mp4]
    avatar-serve live AVATAR --audio FILE [-o live.mp4]      (a live session, streamed at real-time pace)

Failures end with one line on stderr and a non-zero exit status, never a traceback (set
AVATAR_SERVE_DEBUG=1 to see one): 1 for an error answer or an unreachable server, 2 for bad
arguments, 130 for Ctrl-C (which cancels a running `generate` job on the server).

The commands live beside this module: demo.py (`demo`), download.py (`download`), remote.py
(`generate` and `speak` on a running server, and `explain`, the one line a failure ends with),
live.py (`live`: a live session from a file), progress.py (the progress bars they draw).
"""

from __future__ import annotations

import argparse
import os
import sys

from deployments.cli.demo import cmd_demo
from deployments.cli.download import cmd_download
from deployments.cli.live import cmd_live
from deployments.cli.remote import API_KEY_ENV, EXIT_INTERRUPTED, cmd_generate, cmd_speak, explain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatar-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the product through the graph on a local Ray cluster: a video job, "
                                       "an avatar and a lip-synced talk turn")
    demo.add_argument("--profile", default="tiny")
    demo.add_argument("--prompt", default="a portrait of a woman who smiles and talks")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--speech-seconds", type=float, default=2.0,
                      help="length of the generated speech-like audio of the talk turn")
    demo.add_argument("-o", "--output", default="out/demo.mp4",
                      help="the base clip; the talk turn goes next to it as <name>-talk.mp4, with the "
                           "generated inputs <name>-portrait.png and <name>-speech.wav")
    demo.set_defaults(fn=cmd_demo)
    dl = sub.add_parser("download", help="fetch a profile's weight files (serving never downloads)")
    dl.add_argument("profile", help="a name in configs/ or a path to a profile YAML")
    dl.add_argument("--dir", default=None,
                    help="huggingface_hub cache folder to fill (default: the profile's weights_dir, "
                         "else the default Hugging Face cache)")
    dl.add_argument("--dry-run", action="store_true",
                    help="print per repo the patterns and the files they select; fetch nothing. The "
                         "Hub's listings are saved; offline (HF_HUB_OFFLINE=1, or the Hub unreachable "
                         "within a few seconds) the saved ones answer")
    dl.add_argument("--listings", default=None,
                    help="with --dry-run: folder of saved repo listings (<owner>__<name>.txt) "
                         "to use instead of asking the Hub")
    dl.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dl.set_defaults(fn=cmd_download)
    seed_help = "-1: a random one (as diffusers / ComfyUI take it)"
    timeout_help = "seconds to wait for each answer or progress event (default 600; connecting: 10)"
    gen = sub.add_parser("generate", help="create a video job on a running server, show progress, save the MP4 "
                                          "(Ctrl-C cancels the job)")
    gen.add_argument("image")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.mp4")
    gen.add_argument("--audio", default=None,
                     help="speech file (wav, mp3, ogg/opus, flac, m4a): the clip is lip-synced to it "
                          "(25 fps, as long as the audio)")
    gen.add_argument("--url", default="http://127.0.0.1:8000")
    gen.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    gen.add_argument("--timeout", type=float, default=None, help=timeout_help)
    gen.add_argument("--size", default=None, help="WIDTHxHEIGHT")
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--seconds", type=float, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None, help=f"default: a random one; {seed_help}")
    gen.add_argument("--negative-prompt", default=None)
    gen.set_defaults(fn=cmd_generate)
    spk = sub.add_parser("speak", help="lip-sync speech onto an avatar (created from --image/--prompt if needed)")
    spk.add_argument("audio", help="speech file: wav, mp3, ogg/opus, flac, m4a")
    spk.add_argument("--avatar", default=None, help="an existing avatar id")
    spk.add_argument("--image", default=None)
    spk.add_argument("--prompt", default=None)
    spk.add_argument("--size", default=None)
    spk.add_argument("--seed", type=int, default=None,
                     help=f"of the avatar's base clip (default 0: the same inputs give the same avatar); {seed_help}")
    spk.add_argument("-o", "--output", default="speech.mp4")
    spk.add_argument("--url", default="http://127.0.0.1:8000")
    spk.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    spk.add_argument("--timeout", type=float, default=None, help=timeout_help)
    spk.set_defaults(fn=cmd_speak)
    live = sub.add_parser("live", help="a live session on an avatar: stream a speech file at real-time pace over "
                                       "the WebSocket and save the continuous stream that comes back")
    live.add_argument("avatar", help="a ready avatar's id")
    live.add_argument("--audio", required=True, help="speech file: wav, mp3, ogg/opus, flac, m4a")
    live.add_argument("-o", "--output", "--out", default="live.mp4")
    live.add_argument("--chunk-ms", type=float, default=100.0, help="audio sent per message, in ms (default 100)")
    live.add_argument("--lead-in", type=float, default=0.5, help="seconds of idle before the speech (default 0.5)")
    live.add_argument("--tail", type=float, default=1.0, help="seconds of idle after it, then close (default 1)")
    live.add_argument("--url", default="http://127.0.0.1:8000")
    live.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    live.add_argument("--timeout", type=float, default=None, help=timeout_help)
    live.set_defaults(fn=cmd_live)
    args = parser.parse_args(argv)
    if os.environ.get("AVATAR_SERVE_DEBUG"):
        return args.fn(args)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a command line says what failed in one line
        print(f"error: {explain(exc, args)}", file=sys.stderr)
        return 1
