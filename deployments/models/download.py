"""`avatar-serve download PROFILE`: fetch exactly the files a profile's weights sources need.

The profile is the only source of truth. Each stage's weights source says which repository and
which part of it the stage loads (mirroring the loaders, deployments/models/wan/components.py
and deployments/models/musetalk/components.py):

- `diffusers`: only the folders the stage uses -- `text_encoder` + `tokenizer` + `vae` for the
  encoder, `vae` for the decoder, `transformer` (high) / `transformer_2` (low) for the experts
  (`subfolder` overrides the usual folder, as in the loaders) -- plus `model_index.json`;
- `wan_safetensors` / `gguf`: the one expert file, and from the `config` repo only the
  `transformer*/config.json` files (never the bf16/fp32 shards that the quantised file replaces);
- `musetalk` (lip-sync): the UNet state dict and its config from `repo`; the SD VAE and whisper-tiny
  repos as single-model folders: their root `config.json` and safetensors weights (whisper also its
  `preprocessor_config.json`), never the repos' READMEs, tokenizers or other weight formats;
- `random`: nothing; a source that is a local path: nothing to fetch, only checked;
- an expert's start-up LoRAs (`stages.high.loras`, `stages.low.loras`): each its one file.

`plan()` turns that into huggingface_hub allow/ignore patterns, one `RepoPlan` per repository;
`download()` hands each to `snapshot_download` (the Hugging Face cache layout under `weights_dir`);
`check_weights_present()` verifies, with `local_files_only`, that every needed file is on disk and
otherwise raises `MissingWeightsError` naming the profile and the command to run.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from huggingface_hub import snapshot_download
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    filter_repo_objects,
)

from deployments.common.errors import MissingWeightsError
from deployments.config import MODEL_STAGES, GraphConfig
from deployments.config_weights import (
    EXPERT_SUBFOLDERS,
    DiffusersWeights,
    GGUFWeights,
    RandomWeights,
    WanSafetensorsWeights,
    expert_subfolder,
)
from deployments.models.hub import resolve_dir, resolve_file

# Other serialisations of the same weights that diffusers / transformers never read when
# safetensors are present: never fetched from a diffusers folder.
ALT_WEIGHT_FORMATS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx",
                      "*.onnx_data")

# What a repository that is itself one diffusers / transformers model (no subfolder) gives its
# loader: the config and the safetensors weights, sharded or not.
ROOT_MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")

# The diffusers config folders of both experts: what a single-file expert (wan_safetensors,
# gguf) takes from its `config` repository. Both, whatever the role: they are a few hundred bytes
# and the single-file loaders may name either subfolder.
EXPERT_CONFIGS = tuple(f"{folder}/config.json" for folder in EXPERT_SUBFOLDERS.values())


class RepoPlan(NamedTuple):
    """What `snapshot_download` fetches from one repository."""

    repo_id: str
    allow_patterns: tuple[str, ...]
    ignore_patterns: tuple[str, ...] = ()


class Need(NamedTuple):
    """One thing a stage reads: a `folder` (a diffusers / transformers component folder or the
    tokenizer) or a single `file`, inside `source` (a repo id or a local folder; None: `path` is
    itself a local file)."""

    stage: str
    source: str | None
    kind: str          # "model" | "tokenizer" | "file"
    path: str


# ------------------------------------------------------------------ what each stage reads


def is_local(source: str | None) -> bool:
    """A weights source that names a local file or folder rather than a Hub repo id."""
    if source is None:
        return True
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def needs(cfg: GraphConfig) -> list[Need]:
    """Everything the profile's stages read, in stage order (mirrors the loaders in
    deployments/models/wan/components.py and deployments/models/musetalk/components.py)."""
    out: list[Need] = []
    for stage in MODEL_STAGES:
        stage_cfg = getattr(cfg.stages, stage)
        w = stage_cfg.weights
        if isinstance(w, RandomWeights):
            pass
        elif isinstance(w, DiffusersWeights):
            sub = w.subfolder
            if stage == "encoder":
                out += [Need(stage, w.path, "model", sub or "text_encoder"),
                        Need(stage, w.path, "tokenizer", "tokenizer"),
                        Need(stage, w.path, "model", sub or "vae")]
            elif stage == "decoder":
                out.append(Need(stage, w.path, "model", sub or "vae"))
            elif stage in ("high", "low"):
                out.append(Need(stage, w.path, "model", sub or expert_subfolder(stage)))
            else:
                raise ValueError(f"no download rule for stage {stage!r} with weights of kind "
                                 f"{w.kind!r}; add one in deployments/models/download.py")
        elif getattr(w, "kind", None) == "musetalk" and stage == "lipsync":
            # MuseTalk layout (config_weights.MuseTalkWeights): two files of its repo, and the SD
            # VAE and whisper-tiny as whole model repos (or local folders); the whisper feature
            # extractor reads the repo's preprocessor_config.json (load_models in
            # deployments/models/musetalk/components.py).
            out += [Need(stage, w.repo, "file", w.unet), Need(stage, w.repo, "file", w.unet_config),
                    Need(stage, w.vae, "model", ""), Need(stage, w.whisper, "model", ""),
                    Need(stage, w.whisper, "file", "preprocessor_config.json")]
        elif isinstance(w, (WanSafetensorsWeights, GGUFWeights)):
            if stage not in ("high", "low"):
                raise ValueError(f"stage {stage!r} cannot use weights of kind {w.kind!r}")
            out.append(Need(stage, w.repo, "file", w.filename))
            out += [Need(stage, w.config, "file", f) for f in EXPERT_CONFIGS]
        else:
            raise ValueError(f"no download rule for weights of kind {w.kind!r} (stage {stage!r})")
        # An expert's start-up LoRAs (config_weights.StartupLora): one file each, whatever its weights.
        out += [Need(stage, lora.repo, "file", lora.filename) for lora in getattr(stage_cfg, "loras", ())]
    return out


# ------------------------------------------------------------------ patterns


def plan(cfg: GraphConfig) -> list[RepoPlan]:
    """One `RepoPlan` per Hub repository the profile reads from, in first-use order."""
    allow: dict[str, list[str]] = {}
    ignore: dict[str, list[str]] = {}
    exact: dict[str, list[str]] = {}
    for need in needs(cfg):
        if is_local(need.source):
            continue
        repo = need.source
        pats = allow.setdefault(repo, [])
        if need.kind == "file":
            pats.append(glob.escape(need.path))
            exact.setdefault(repo, []).append(need.path)
        elif need.kind == "model" and not need.path:
            # A whole repository as one model: what from_pretrained and `_check` read at its root
            # (config + safetensors weights), not `*`, which would take the repo's README,
            # .gitattributes and tokenizer files too. Other files it needs are named as `file`s.
            pats += list(ROOT_MODEL_FILES)
        else:
            pats += [_join(need.path, "*"), "model_index.json"]
            ignore.setdefault(repo, []).extend(ALT_WEIGHT_FORMATS)
    plans = []
    for repo, pats in allow.items():
        # An ignore pattern must never drop a file a stage names exactly.
        ign = [p for p in _unique(ignore.get(repo, []))
               if not list(filter_repo_objects(exact.get(repo, []), allow_patterns=[p]))]
        plans.append(RepoPlan(repo, tuple(_unique(pats)), tuple(ign)))
    return plans


def select(listing: Iterable[str], repo_plan: RepoPlan) -> list[str]:
    """The files of a repository listing that `snapshot_download` fetches for `repo_plan`
    (huggingface_hub's own matcher, as snapshot_download applies it)."""
    return sorted(filter_repo_objects(list(listing),
                                      allow_patterns=list(repo_plan.allow_patterns),
                                      ignore_patterns=list(repo_plan.ignore_patterns) or None))


def _join(folder: str, name: str) -> str:
    """`folder/name`, or `name` for a repo's root folder ("")."""
    return f"{folder}/{name}" if folder else name


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------ fetching


def download(cfg: GraphConfig, weights_dir: str | None = None, progress: bool = True,
             fetch: Callable[..., str] | None = None) -> dict[str, str]:
    """Fetch every repo of `plan(cfg)` into the huggingface_hub cache at `weights_dir`
    (default: the profile's `weights_dir`, else the default Hugging Face cache).

    `fetch` is `huggingface_hub.snapshot_download` unless given (tests pass a stand-in).
    Returns {repo_id: local snapshot folder}.
    """
    fetch = fetch or snapshot_download
    cache_dir = weights_dir if weights_dir is not None else cfg.weights_dir
    restore = None
    if not progress and not are_progress_bars_disabled():
        disable_progress_bars()
        restore = enable_progress_bars
    try:
        return {p.repo_id: fetch(p.repo_id, allow_patterns=list(p.allow_patterns),
                                 ignore_patterns=list(p.ignore_patterns) or None,
                                 cache_dir=cache_dir)
                for p in plan(cfg)}
    finally:
        if restore:
            restore()


# ------------------------------------------------------------------ checking


def check_weights_present(cfg: GraphConfig, profile_name: str) -> None:
    """Raise `MissingWeightsError` (naming the profile and `avatar-serve download <profile>`)
    unless every file the profile's stages read is on local disk. Never downloads."""
    missing: list[str] = []
    for need in _unique_needs(needs(cfg)):
        try:
            _check(need, cfg.weights_dir)
        except MissingWeightsError as e:
            missing.append(e.what)
    if missing:
        what = ", ".join(_unique(missing)[:6])
        if len(_unique(missing)) > 6:
            what += f" (and {len(_unique(missing)) - 6} more)"
        raise MissingWeightsError(what, profile_name)


def _unique_needs(items: list[Need]) -> list[Need]:
    seen, out = set(), []
    for n in items:
        key = (n.source, n.kind, n.path)
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def _check(need: Need, weights_dir: str | None) -> None:
    if need.kind == "file":
        resolve_file(need.source, need.path, weights_dir)
        return
    local = is_local(need.source)
    root = Path(need.source).expanduser() if local else resolve_dir(need.source, weights_dir)
    label = need.source.rstrip("/") + (f"/{need.path}" if need.path else "")
    folder = root / need.path
    if not folder.is_dir():
        raise MissingWeightsError(f"{label}/")

    def file_(rel: str) -> None:
        if local:
            if not (root / rel).is_file():
                raise MissingWeightsError(f"{need.source}/{rel}")
        else:
            resolve_file(need.source, rel, weights_dir)

    if need.kind == "tokenizer":
        file_(_join(need.path, "tokenizer_config.json"))
        if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            raise MissingWeightsError(f"{label}/tokenizer.json or spiece.model")
        return
    file_(_join(need.path, "config.json"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        for index in indexes:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            for shard in shards:
                file_(_join(need.path, shard))
    elif not any(f.is_file() for f in folder.glob("*.safetensors")):
        raise MissingWeightsError(f"{label}/*.safetensors")


# ------------------------------------------------------------------ dry run


def read_listing(path: str | Path) -> list[str]:
    """A saved repository listing: one path per line; '#' lines are comments."""
    lines = Path(path).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def listing_file(listings_dir: str | Path, repo_id: str) -> Path:
    return Path(listings_dir) / (repo_id.replace("/", "__") + ".txt")


# How long a dry run waits for the Hub to answer at all before it treats itself as offline
# (huggingface_hub itself retries an unreachable Hub for about 20 s per repository).
HUB_PROBE_TIMEOUT_S = 5.0


def saved_listings_dir() -> Path:
    """Where a dry run saves the Hub's listings, for later offline dry runs:
    `$AVATAR_SERVE_STORAGE/hub-listings`, else `~/.cache/avatar-serve/hub-listings`."""
    root = os.environ.get("AVATAR_SERVE_STORAGE") or os.path.join("~", ".cache", "avatar-serve")
    return Path(root).expanduser() / "hub-listings"


def hub_offline_reason() -> str | None:
    """Why the Hub must not be asked at all (huggingface_hub's offline mode), else None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return None


def probe_hub(timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """One request to the Hub's endpoint (HF_ENDPOINT), no retries: raises the transport error
    (httpx.ConnectError, a timeout) when it does not answer within `timeout` seconds."""
    import httpx
    from huggingface_hub import constants

    httpx.head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)


def hub_listing(repo_id: str) -> list[str]:
    """The repository's file list from the Hub (network). An unreachable Hub fails within
    HUB_PROBE_TIMEOUT_S instead of huggingface_hub's retries."""
    from huggingface_hub import HfApi

    probe_hub()
    return HfApi().list_repo_files(repo_id)


def _network_error(exc: BaseException) -> bool:
    """The Hub could not be reached (as opposed to a refusal for one repository: gated, 404)."""
    import httpx

    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)) or (
        isinstance(exc, OSError) and not hasattr(exc, "response"))


def save_listing(saved_dir: Path, repo_id: str, files: list[str]) -> None:
    """Keep the Hub's answer for offline dry runs (best effort: a read-only home is fine)."""
    try:
        saved_dir.mkdir(parents=True, exist_ok=True)
        path = listing_file(saved_dir, repo_id)
        tmp = path.with_suffix(".tmp")
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        tmp.write_text(f"# {repo_id}: the Hub's listing, saved by avatar-serve download --dry-run "
                       f"on {stamp}\n" + "".join(f"{f}\n" for f in files))
        tmp.replace(path)
    except OSError:
        pass


def dry_run_lines(cfg: GraphConfig, weights_dir: str | None = None,
                  listings_dir: str | Path | None = None, saved_dir: str | Path | None = None) -> list[str]:
    """What `download` would fetch, per repository: the patterns, and the files they select from
    the repository listing -- a saved one in `listings_dir` (`<owner>__<name>.txt`) when given,
    else the Hub's; without a listing, the patterns alone.

    Without `listings_dir`, each listing the Hub gives is saved in `saved_dir` (default
    `saved_listings_dir()`); when the Hub cannot be asked (HF_HUB_OFFLINE, or no answer within
    HUB_PROBE_TIMEOUT_S: it is then not asked again for the other repositories), the saved
    listing answers. An offline dry run therefore takes seconds, not huggingface_hub's retries."""
    cache = weights_dir if weights_dir is not None else cfg.weights_dir
    saved_dir = Path(saved_dir) if saved_dir is not None else saved_listings_dir()
    out = [f"profile {cfg.name}: into {cache or 'the default Hugging Face cache'}"]
    plans = plan(cfg)
    if not plans:
        out.append("  nothing to download (random or local weights only)")
    hub_down = hub_offline_reason() if listings_dir is None else None
    unlisted = 0
    for p in plans:
        out.append(p.repo_id)
        out.append("  allow:  " + " ".join(p.allow_patterns))
        if p.ignore_patterns:
            out.append("  ignore: " + " ".join(p.ignore_patterns))
        listing, origin = None, None
        if listings_dir is not None:
            f = listing_file(listings_dir, p.repo_id)
            if f.is_file():
                listing, origin = read_listing(f), str(f)
            else:
                origin = f"no {f}"
        else:
            if hub_down is None:
                try:
                    listing, origin = hub_listing(p.repo_id), "the Hub"
                    save_listing(saved_dir, p.repo_id, listing)
                except Exception as e:  # offline, unreachable, gated: fall back
                    origin = f"{type(e).__name__}"
                    if _network_error(e):
                        hub_down = origin  # do not wait on the network again for the next repos
            else:
                origin = hub_down
            saved = listing_file(saved_dir, p.repo_id)
            if listing is None and saved.is_file():
                listing, origin = read_listing(saved), f"{saved}, saved earlier; the Hub: {origin}"
        if listing is None:
            unlisted += 1
            out.append(f"  (no listing{f': {origin}' if origin else ''}; the patterns above decide)")
            continue
        files = select(listing, p)
        out.append(f"  {len(files)} files (listing from {origin}):")
        out += [f"    {f}" for f in files]
    if unlisted and listings_dir is None:
        out.append(f"to see the files offline: run this once online (the listings are saved in "
                   f"{saved_dir}), or give --listings DIR (saved listings, <owner>__<name>.txt)")
    return out
