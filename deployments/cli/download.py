"""`avatar-serve download PROFILE`: fetch a profile's weight files into the Hugging Face cache (or
--dir), then check that every file the profile needs is there; `--dry-run` lists what would be
fetched and fetches nothing. Serving itself never downloads.
"""

from __future__ import annotations

import argparse
import sys


def cmd_download(args: argparse.Namespace) -> int:
    from deployments.common.errors import MissingWeightsError
    from deployments.models import download as dl
    from deployments.profiles import load_profile

    cfg = load_profile(args.profile, {"weights_dir": args.dir} if args.dir else None)
    if args.dry_run:
        print("\n".join(dl.dry_run_lines(cfg, listings_dir=args.listings)))
        return 0
    plans = dl.plan(cfg)
    where = cfg.weights_dir or "the default Hugging Face cache"
    for repo, path in dl.download(cfg, cfg.weights_dir, progress=not args.quiet).items():
        print(f"{repo}: {path}")
    try:
        dl.check_weights_present(cfg, args.profile)
    except MissingWeightsError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"profile {cfg.name}: all weights present in {where}"
          + ("" if plans else " (nothing to download)"))
    if args.dir:
        print(f"serve with weights_dir {args.dir!r}: set it in the profile, or pass "
              f"overrides: {{weights_dir: {args.dir}}} in serve_config.yaml args")
    return 0
