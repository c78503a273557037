"""Profiles: YAML files in `configs/` (or any path) -> one validated `GraphConfig`.

    load_profile("wan22-i2v-a14b-distill-fp8", overrides)
      = the file, merged over its `extends:` chain (bases `_...` are not servable)
      + `overrides` (GraphArgs.overrides in serve_config.yaml)
      + the `placement:` preset's GPU shares under the stages' own placement
      -> GraphConfig, validated once (graph-level values reach the stages as constructor
         arguments: GraphConfig.stage_arguments).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from deployments.config import GraphConfig
from deployments.config_serving import ServingConfig, WebhookConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Placement presets: the GPU share of each stage's replica, so the same weights run on 1, 2, 4 or
# 5+ GPUs without editing. Ray packs fractional shares onto GPUs; a share above 0.5 keeps two
# replicas off one GPU, which is how the experts are kept apart. Lip-sync shares leave room for
# its second replica (autoscaling) next to the first. A profile picks one with `placement: NAME`;
# a stage's own `placement.num_gpus` in the profile still wins.
PLACEMENTS: dict[str, dict[str, float]] = {
    # five GPUs: one per Wan stage, the lip-sync replicas sharing the fifth
    "per-stage": {"encoder": 1, "high": 1, "low": 1, "decoder": 1, "lipsync": 0.5},
    # four GPUs: each expert alone; the encoder; decoder and lip-sync together
    "four-gpu": {"encoder": 1, "high": 1, "low": 1, "decoder": 0.5, "lipsync": 0.25},
    # two GPUs: the experts never share one; encoder, decoder and lip-sync fill the rest
    "two-gpu": {"encoder": 0.2, "high": 0.6, "low": 0.6, "decoder": 0.2, "lipsync": 0.1},
    # one GPU for everything (an H200 holds both fp8 or bf16 experts, the encoder and MuseTalk);
    # the shares leave room for two lip-sync replicas (0.15 + 2 x 0.25 + 0.1 + 2 x 0.1 = 0.95)
    "single-gpu": {"encoder": 0.15, "high": 0.25, "low": 0.25, "decoder": 0.1, "lipsync": 0.1},
}

# Jobs running at once under each preset: a job is in one GPU stage at a time, so the pipeline
# needs as many jobs as stages that can work in parallel -- encoder, both experts and decoder
# on their own GPUs (per-stage, four-gpu: 4); two experts apart plus the encoder or decoder
# beside them (two-gpu: 3); one GPU (2: the second job's encode, hops and mux fill the gaps
# of the first; measured in bench/README.md).
RUNNING_JOBS: dict[str, int] = {"per-stage": 4, "four-gpu": 4, "two-gpu": 3, "single-gpu": 2}


def deep_merge(base: dict, overrides: dict) -> dict:
    """Return `base` with `overrides` merged in, recursing into nested mappings. A mapping whose
    `kind` differs from the base's (another weights source) replaces it whole."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("kind", old.get("kind")) == old.get("kind"):
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_names() -> list[str]:
    """The servable profiles in `configs/` (bases, named `_...`, are not)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def profile_path(profile: str, relative_to: Path = CONFIG_DIR) -> Path:
    """A profile is a name in `configs/` (`tiny`) or a path to a YAML file."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        path = path if path.is_absolute() or path.exists() else relative_to / path
        if path.exists():
            return path
    candidate = CONFIG_DIR / f"{profile}.yaml"
    if not candidate.exists():
        raise ValueError(f"unknown profile {profile!r}; known profiles: {', '.join(profile_names())}")
    return candidate


def read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A profile's YAML with its `extends:` chain merged in (the base first, then this file)."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"profile {path.name}: 'extends' goes in a circle ({' -> '.join(p.name for p in seen)})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"profile {path.name}: expected a mapping at the top")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    return deep_merge(read_profile(profile_path(base, path.parent), (*seen, path)), raw)


def load_profile(profile: str = "tiny", overrides: dict[str, Any] | None = None) -> GraphConfig:
    path = profile_path(profile)
    if path.stem.startswith("_"):
        raise ValueError(f"{path.stem!r} is a base for other profiles ('extends: {path.stem}'), not a "
                         f"profile to serve; known profiles: {', '.join(profile_names())}")
    raw = read_profile(path)
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate_profile(raw)


def read_keys(serving: dict, kind: str) -> list[str]:
    """The `kind` ("api" or "admin") keys of the environment variable and the file that `serving`
    names, read here, once, in the process that builds the application. A source that is
    configured but yields no key stops start-up: a server never runs open by accident."""
    keys = []
    env_name = serving.get(f"{kind}_keys_env", ServingConfig.model_fields[f"{kind}_keys_env"].default)
    if env_name and os.environ.get(env_name):
        found = [k.strip() for k in os.environ[env_name].split(",") if k.strip()]
        if not found:
            raise ValueError(f"the environment variable {env_name} is set but holds no key "
                             "(comma-separated keys expected)")
        keys += found
    path = serving.get(f"{kind}_keys_file")
    if path:
        keys += _secret_lines(path, f"serving.{kind}_keys_file", "keys", "no key (one a line expected)")
    return keys


def _secret_lines(path: str, field: str, what: str, none: str) -> list[str]:
    """The lines of a keys or secret file that are not blank or '#' comments; a file that is
    named but cannot be read, or holds none, stops start-up (never a server running open)."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{field} {path!r} cannot be read ({exc}); the server does not start without "
                         f"the {what} it was given") from None
    lines = [line for line in map(str.strip, text.splitlines()) if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{field} {path!r} holds {none}")
    return lines


def read_webhook_secret(webhooks: dict) -> str | None:
    """The webhook signing secret from the profile, the environment variable and the file that
    `webhooks` names, read here, once, like the API keys (read_keys). A source that is configured
    but gives nothing stops start-up; two sources giving different secrets do too (a delivery is
    signed with one)."""
    found = {}
    if webhooks.get("secret"):
        found["serving.webhooks.secret"] = webhooks["secret"]
    env_name = webhooks.get("secret_env", WebhookConfig.model_fields["secret_env"].default)
    if env_name and os.environ.get(env_name):
        if not os.environ[env_name].strip():
            raise ValueError(f"the environment variable {env_name} is set but blank (the webhook secret expected)")
        found[f"the environment variable {env_name}"] = os.environ[env_name].strip()
    path = webhooks.get("secret_file")
    if path:
        found[f"serving.webhooks.secret_file {path!r}"] = _secret_lines(
            path, "serving.webhooks.secret_file", "secret", "no secret")[0]
    if len(set(found.values())) > 1:
        raise ValueError(f"different webhook secrets in {' and '.join(found)}: give it in one place")
    return next(iter(found.values()), None)


def validate_profile(raw: dict) -> GraphConfig:
    """A profile's merged YAML -> GraphConfig: the placement preset's shares go under the stages'
    own placement, storage defaults to the profile's folder (and the avatars beside it), API and
    admin keys from their environment variables and files are added (read_keys), and the
    webhook secret from its sources (read_webhook_secret)."""
    raw = copy.deepcopy(raw)
    preset = raw.get("placement")
    if preset is not None:
        if preset not in PLACEMENTS:
            raise ValueError(f"placement {preset!r} is not a preset; choose one of {', '.join(PLACEMENTS)}")
        shares = {stage: {"placement": {"num_gpus": share}} for stage, share in PLACEMENTS[preset].items()}
        raw["stages"] = deep_merge(shares, raw.get("stages") or {})
        # Enough jobs at once to keep every GPU of the preset on a different job (a profile's own
        # serving.max_running_jobs wins).
        raw.setdefault("serving", {}).setdefault("max_running_jobs", RUNNING_JOBS[preset])
    stages = raw.setdefault("stages", {})
    # The audio limit is stated once, in `limits`; the lip-sync stage gets it from the graph.
    if "max_audio_seconds" in (stages.get("lipsync") or {}):
        raise ValueError("set the audio length limit as limits.max_audio_seconds (the ingress and the "
                         "lip-sync stage both apply it), not stages.lipsync.max_audio_seconds")
    serving = raw.setdefault("serving", {})
    if not serving.get("storage_dir"):  # persistent by default: jobs outlive an ingress restart
        root = os.environ.get("AVATAR_SERVE_STORAGE") or os.path.join("~", ".cache", "avatar-serve")
        serving["storage_dir"] = os.path.join(os.path.expanduser(root), str(raw.get("name", "profile")))
    # Prepared avatars beside the jobs by default, so an avatar the ingress lists as ready after a
    # restart is still there for the lip-sync stage (a restarted replica reloads it from the folder).
    stages.setdefault("lipsync", {}).setdefault("avatar_cache_dir", os.path.join(serving["storage_dir"], "avatars"))
    for kind in ("api", "admin"):
        serving[f"{kind}_keys"] = list(serving.get(f"{kind}_keys") or []) + read_keys(serving, kind)
    if isinstance(serving.get("webhooks", {}), dict):  # (anything else: the model's own error)
        webhooks = serving.setdefault("webhooks", {})
        webhooks["secret"] = read_webhook_secret(webhooks)
    return GraphConfig.model_validate(raw)
