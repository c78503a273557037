"""What each profile downloads, and `avatar-serve download` (offline: no network, no Ray). The
profiles' own settings are pinned in tests/test_profiles.py.

The saved repo listings in tests/data/repo_listings/ stand in for the Hub; the patterns a profile
produces are applied to them with huggingface_hub's own matcher, and the selected files are
compared with sets spelled out here. `download()` runs end to end against a stand-in for
`snapshot_download` that fills a real huggingface_hub cache layout from a fake remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import filter_repo_objects

from deployments import cli
from deployments.models import download as dl
from deployments.models.hub import MissingWeightsError
from deployments.profiles import load_profile, profile_names

LISTINGS = Path(__file__).parent.parent / "data" / "repo_listings"

DIFFUSERS = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
DISTILL = "lightx2v/Wan2.2-Distill-Models"
GGUF = "QuantStack/Wan2.2-I2V-A14B-GGUF"
DISTILL_LORAS = "lightx2v/Wan2.2-Distill-Loras"
MUSETALK = "TMElyralab/MuseTalk"
SD_VAE = "stabilityai/sd-vae-ft-mse"
WHISPER = "openai/whisper-tiny"
# ------------------------------------------------------------------ expected selections

TEXT_ENCODER = {
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00003.safetensors",
    "text_encoder/model-00002-of-00003.safetensors",
    "text_encoder/model-00003-of-00003.safetensors",
    "text_encoder/model.safetensors.index.json",
}
TOKENIZER = {
    "tokenizer/special_tokens_map.json",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
}
VAE = {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
EXPERT_CONFIGS = {"transformer/config.json", "transformer_2/config.json"}


def _expert_folder(folder: str) -> set[str]:
    return ({f"{folder}/config.json", f"{folder}/diffusion_pytorch_model.safetensors.index.json"}
            | {f"{folder}/diffusion_pytorch_model-{i:05d}-of-00012.safetensors"
               for i in range(1, 13)})


# What a quantised / distilled profile takes from the diffusers repo: encoder + VAE, and of the
# transformers only their config.json.
DIFFUSERS_NO_EXPERTS = {"model_index.json"} | TEXT_ENCODER | TOKENIZER | VAE | EXPERT_CONFIGS

# What the MuseTalk lip-sync stage of every real profile reads (load_models in
# deployments/models/musetalk/components.py):
# the v1.5 UNet state dict + its config; the SD VAE and whisper-tiny as root-level model folders,
# config + safetensors only (the repos also hold .bin / tf / flax copies, READMEs, tokenizers);
# whisper's feature extractor reads preprocessor_config.json.
LIPSYNC = {
    MUSETALK: {"musetalkV15/unet.pth", "musetalkV15/musetalk.json"},
    SD_VAE: {"config.json", "diffusion_pytorch_model.safetensors"},
    WHISPER: {"config.json", "model.safetensors", "preprocessor_config.json"},
}

# The lightx2v 4-step distill LoRAs for Wan2.2 I2V (LightX2V's lora_configs for the MoE distill
# runner name one per expert): the high-noise one goes on the high expert, the low-noise on the low.
DISTILL_LORA_HIGH = "wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors"
DISTILL_LORA_LOW = "wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors"
DISTILL_LORA_FILES = {DISTILL_LORA_HIGH, DISTILL_LORA_LOW}

EXPECTED: dict[str, dict[str, set[str]]] = {
    "tiny": {},
    "random-a14b": {},
    "wan22-i2v-a14b-bf16": {
        DIFFUSERS: ({"model_index.json"} | TEXT_ENCODER | TOKENIZER | VAE
                    | _expert_folder("transformer") | _expert_folder("transformer_2")),
        **LIPSYNC,
    },
    "wan22-i2v-a14b-distill-fp8": {
        DIFFUSERS: DIFFUSERS_NO_EXPERTS,
        DISTILL: {"wan2.2_i2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
                  "wan2.2_i2v_A14b_low_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors"},
        **LIPSYNC,
    },
    "wan22-i2v-a14b-distill-bf16": {
        DIFFUSERS: DIFFUSERS_NO_EXPERTS,
        DISTILL: {"wan2.2_i2v_A14b_high_noise_lightx2v_4step.safetensors",
                  "wan2.2_i2v_A14b_low_noise_lightx2v_4step.safetensors"},
        **LIPSYNC,
    },
    "wan22-i2v-a14b-gguf-q4km": {
        DIFFUSERS: DIFFUSERS_NO_EXPERTS,
        GGUF: {"HighNoise/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf",
               "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"},
        **LIPSYNC,
    },
    "wan22-i2v-a14b-gguf-q8": {
        DIFFUSERS: DIFFUSERS_NO_EXPERTS,
        GGUF: {"HighNoise/Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf",
               "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q8_0.gguf"},
        **LIPSYNC,
    },
    # The seed's 4-step GGUF recipe: the same experts plus the lightx2v distill LoRA of each.
    "wan22-i2v-a14b-gguf-q4km-4step": {
        DIFFUSERS: DIFFUSERS_NO_EXPERTS,
        GGUF: {"HighNoise/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf",
               "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"},
        DISTILL_LORAS: DISTILL_LORA_FILES,
        **LIPSYNC,
    },
    "wan22-i2v-a14b-gguf-q8-4step": {
        DIFFUSERS: DIFFUSERS_NO_EXPERTS,
        GGUF: {"HighNoise/Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf",
               "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q8_0.gguf"},
        DISTILL_LORAS: DISTILL_LORA_FILES,
        **LIPSYNC,
    },
}
REAL_PROFILES = [p for p, repos in EXPECTED.items() if repos]
QUANTISED_PROFILES = [p for p in REAL_PROFILES if p != "wan22-i2v-a14b-bf16"]


def listing(repo_id: str) -> list[str]:
    return dl.read_listing(dl.listing_file(LISTINGS, repo_id))


def selection(profile: str) -> dict[str, set[str]]:
    return {p.repo_id: set(dl.select(listing(p.repo_id), p)) for p in dl.plan(load_profile(profile))}


# ------------------------------------------------------------------ patterns


def test_every_profile_in_configs_is_covered_and_loads():
    names = profile_names()
    # Every profile in configs/ has its expected selection spelled out here (and vice versa).
    assert names == sorted(EXPECTED), names
    for name in names:
        cfg = load_profile(name)
        assert cfg.name == name


@pytest.mark.parametrize("profile", sorted(EXPECTED))
def test_patterns_select_exactly_the_expected_files(profile):
    assert selection(profile) == EXPECTED[profile]


def test_one_plan_per_repo():
    for profile in EXPECTED:
        repos = [p.repo_id for p in dl.plan(load_profile(profile))]
        assert len(repos) == len(set(repos)), repos


@pytest.mark.parametrize("profile", QUANTISED_PROFILES)
def test_quantised_profiles_never_fetch_the_expert_shards(profile):
    picked = selection(profile)[DIFFUSERS]
    shards = set(filter_repo_objects(picked, allow_patterns=["transformer*/diffusion_pytorch_model*"]))
    assert shards == set()
    # ... and the listing does have them: the patterns, not the listing, keep them out.
    assert len(set(filter_repo_objects(listing(DIFFUSERS),
                                       allow_patterns=["transformer*/diffusion_pytorch_model-*"]))) == 24
    # no other expert variant of the quantised repo either (other quant types, T2V, int8, split)
    quant_repo = DISTILL if "distill" in profile else GGUF
    assert len(selection(profile)[quant_repo]) == 2 < len(listing(quant_repo))


def test_exact_file_is_never_dropped_by_an_ignore_pattern():
    """A single-file source in a repo that also serves a diffusers folder keeps its file even
    when its extension is one of the formats ignored for diffusers folders."""
    cfg = load_profile("wan22-i2v-a14b-distill-fp8", {"stages": {"high": {"weights": {
        "kind": "wan_safetensors", "repo": DIFFUSERS, "filename": "extra/high.pth",
        "config": DIFFUSERS}}}})
    (p,) = [p for p in dl.plan(cfg) if p.repo_id == DIFFUSERS]
    assert "*.pth" not in p.ignore_patterns and "*.bin" in p.ignore_patterns
    assert dl.select(listing(DIFFUSERS) + ["extra/high.pth", "vae/x.bin"], p).count("extra/high.pth") == 1
    assert "vae/x.bin" not in dl.select(listing(DIFFUSERS) + ["vae/x.bin"], p)


def test_subfolder_override_follows_the_loaders():
    cfg = load_profile("wan22-i2v-a14b-bf16", {"stages": {"low": {"weights": {
        "kind": "diffusers", "path": DIFFUSERS, "subfolder": "transformer"}}}})
    (p,) = [p for p in dl.plan(cfg) if p.repo_id == DIFFUSERS]
    assert "transformer_2/*" not in p.allow_patterns and "transformer/*" in p.allow_patterns


def test_local_sources_are_not_downloaded(tmp_path):
    cfg = load_profile("wan22-i2v-a14b-gguf-q8", {"stages": {"high": {"weights": {
        "kind": "gguf", "repo": None, "filename": str(tmp_path / "high.gguf"),
        "config": DIFFUSERS}}}})
    repos = {p.repo_id: p for p in dl.plan(cfg)}
    assert repos[GGUF].allow_patterns == ("LowNoise/Wan2.2-I2V-A14B-LowNoise-Q8_0.gguf",)
    # ... but it is checked like any other file
    cfg = load_profile("wan22-i2v-a14b-gguf-q8", {"weights_dir": str(tmp_path / "weights"), "stages": {
        "high": {"weights": {"kind": "gguf", "repo": None, "filename": str(tmp_path / "high.gguf"),
                             "config": DIFFUSERS}}}})
    dl.download(cfg, progress=False, fetch=FakeSnapshot(_fake_remote(tmp_path / "remote")))
    _assert_missing(cfg, "wan22-i2v-a14b-gguf-q8", str(tmp_path / "high.gguf"))
    (tmp_path / "high.gguf").write_bytes(b"GGUF")
    dl.check_weights_present(cfg, "wan22-i2v-a14b-gguf-q8")


# ------------------------------------------------------------------ download end to end


def _fake_remote(root: Path) -> Path:
    """Every listed repo as a folder of tiny files; index jsons name the shards next to them."""
    for txt in LISTINGS.glob("*.txt"):
        repo = root / txt.stem
        files = dl.read_listing(txt)
        for f in files:
            path = repo / f
            path.parent.mkdir(parents=True, exist_ok=True)
            if f.endswith(".safetensors.index.json"):
                folder = os.path.dirname(f)
                shards = [os.path.basename(s) for s in files
                          if os.path.dirname(s) == folder and s.endswith(".safetensors")]
                path.write_text(json.dumps({"metadata": {}, "weight_map": {
                    f"w{i}": s for i, s in enumerate(shards)}}))
            else:
                path.write_text(f"{txt.stem}:{f}")
    return root


class FakeSnapshot:
    """Stands in for `huggingface_hub.snapshot_download`: picks files with huggingface_hub's
    matcher and writes them into a real cache layout (blobs + snapshot symlinks + refs/main)."""

    def __init__(self, remote: Path):
        self.remote, self.calls = remote, []

    def __call__(self, repo_id, *, allow_patterns=None, ignore_patterns=None, cache_dir=None, **kw):
        self.calls.append((repo_id, allow_patterns, ignore_patterns, cache_dir))
        src = self.remote / repo_id.replace("/", "__")
        files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
        files = list(filter_repo_objects(files, allow_patterns=allow_patterns,
                                         ignore_patterns=ignore_patterns))
        repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        rev = hashlib.sha1(repo_id.encode()).hexdigest()
        snap = repo_dir / "snapshots" / rev
        for f in files:
            data = (src / f).read_bytes()
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snap / f
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(rev)
        return str(snap)


def _assert_missing(cfg, profile, *fragments):
    with pytest.raises(MissingWeightsError) as exc:
        dl.check_weights_present(cfg, profile)
    msg = str(exc.value)
    assert exc.value.profile == profile
    assert f"avatar-serve download {profile}" in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.mark.parametrize("profile", REAL_PROFILES)
def test_download_fills_a_cache_that_the_checks_and_hf_hub_download_accept(tmp_path, profile):
    cache = tmp_path / "weights"
    cfg = load_profile(profile, {"weights_dir": str(cache)})
    assert {cfg.stage_arguments(s)["weights_dir"]
            for s in ("encoder", "high", "low", "decoder", "lipsync")} == {str(cache)}
    _assert_missing(cfg, profile, DIFFUSERS)

    fetch = FakeSnapshot(_fake_remote(tmp_path / "remote"))
    paths = dl.download(cfg, str(cache), progress=False, fetch=fetch)
    assert sorted(paths) == sorted(EXPECTED[profile])
    assert [c[0] for c in fetch.calls] == [p.repo_id for p in dl.plan(cfg)]
    assert {c[3] for c in fetch.calls} == {str(cache)}

    # exactly the expected files landed in the cache
    for repo, expected in EXPECTED[profile].items():
        snap = Path(paths[repo])
        got = {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()}
        assert got == expected

    dl.check_weights_present(cfg, profile)          # passes now

    # the cache is a real huggingface_hub cache: local_files_only lookups find the files
    quant = {p.repo_id: p for p in dl.plan(cfg)}
    for repo in EXPECTED[profile]:
        name = sorted(EXPECTED[profile][repo])[-1]
        got = hf_hub_download(repo, name, cache_dir=str(cache), local_files_only=True)
        assert Path(got).read_text() == f"{repo.replace('/', '__')}:{name}"
        assert Path(got).resolve().parent.name == "blobs"
    assert DIFFUSERS in quant

    # one shard gone (its blob deleted: a dangling snapshot link) -> missing again, named
    shard = "text_encoder/model-00002-of-00003.safetensors"
    (Path(paths[DIFFUSERS]) / shard).resolve().unlink()
    _assert_missing(cfg, profile, f"{DIFFUSERS}/{shard}")


def test_check_names_a_missing_expert_file(tmp_path):
    profile = "wan22-i2v-a14b-gguf-q4km"
    cache = tmp_path / "weights"
    cfg = load_profile(profile, {"weights_dir": str(cache)})
    fetch = FakeSnapshot(_fake_remote(tmp_path / "remote"))
    dl.download(cfg, str(cache), progress=False, fetch=fetch)
    dl.check_weights_present(cfg, profile)
    snap = Path(fetch(GGUF, allow_patterns=[], cache_dir=str(cache)))
    (snap / "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf").unlink()
    msg = _assert_missing(cfg, profile, f"{GGUF}/LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf")
    assert "HighNoise" not in msg


def test_check_names_a_missing_lora_file(tmp_path):
    profile = "wan22-i2v-a14b-gguf-q4km-4step"
    cache = tmp_path / "weights"
    cfg = load_profile(profile, {"weights_dir": str(cache)})
    fetch = FakeSnapshot(_fake_remote(tmp_path / "remote"))
    dl.download(cfg, str(cache), progress=False, fetch=fetch)
    dl.check_weights_present(cfg, profile)
    snap = Path(fetch(DISTILL_LORAS, allow_patterns=[], cache_dir=str(cache)))
    (snap / DISTILL_LORA_LOW).unlink()
    msg = _assert_missing(cfg, profile, f"{DISTILL_LORAS}/{DISTILL_LORA_LOW}")
    assert DISTILL_LORA_HIGH not in msg


def test_random_profiles_need_nothing(tmp_path):
    for profile in ("tiny", "random-a14b"):
        cfg = load_profile(profile, {"weights_dir": str(tmp_path / "empty")})
        assert dl.plan(cfg) == []
        dl.check_weights_present(cfg, profile)
        assert dl.download(cfg, fetch=lambda *a, **k: pytest.fail("nothing to fetch")) == {}


# ------------------------------------------------------------------ CLI


def test_cli_dry_run_prints_the_selected_files(capsys, monkeypatch):
    monkeypatch.setattr(dl, "hub_listing", lambda repo: pytest.fail("dry run asked the Hub"))
    assert cli.main(["download", "wan22-i2v-a14b-distill-fp8", "--dry-run",
                     "--listings", str(LISTINGS)]) == 0
    out = capsys.readouterr().out
    lines = {ln.strip() for ln in out.splitlines()}
    for repo, files in EXPECTED["wan22-i2v-a14b-distill-fp8"].items():
        assert repo in lines
        assert f"{len(files)} files (listing from {dl.listing_file(LISTINGS, repo)}):" in lines
        assert files <= lines
    assert "diffusion_pytorch_model-00001-of-00012" not in out
    assert "wan2.2_i2v_A14b_high_noise_lightx2v_4step.safetensors" not in out   # the bf16 file


def test_cli_dry_run_lists_the_lora_files(capsys, monkeypatch):
    monkeypatch.setattr(dl, "hub_listing", lambda repo: pytest.fail("dry run asked the Hub"))
    assert cli.main(["download", "wan22-i2v-a14b-gguf-q8-4step", "--dry-run",
                     "--listings", str(LISTINGS)]) == 0
    out = capsys.readouterr().out
    lines = {ln.strip() for ln in out.splitlines()}
    assert DISTILL_LORAS in lines
    assert f"allow:  {DISTILL_LORA_HIGH} {DISTILL_LORA_LOW}" in lines
    assert f"2 files (listing from {dl.listing_file(LISTINGS, DISTILL_LORAS)}):" in lines
    assert DISTILL_LORA_FILES <= lines and "t2v" not in out


def test_cli_dry_run_without_a_listing_prints_the_patterns(capsys, monkeypatch, tmp_path):
    # no saved listing: the patterns are printed
    monkeypatch.setattr(dl, "hub_listing", lambda repo: pytest.fail("dry run asked the Hub"))
    assert cli.main(["download", "wan22-i2v-a14b-gguf-q8", "--dry-run",
                     "--listings", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "allow:  HighNoise/Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf LowNoise/Wan2.2-I2V-A14B-LowNoise-Q8_0.gguf" in out
    assert "allow:  text_encoder/* model_index.json tokenizer/* vae/* transformer/config.json transformer_2/config.json" in out
    # ... and the lip-sync repos': exact files, and root config + safetensors for whole-repo models
    assert "allow:  musetalkV15/unet.pth musetalkV15/musetalk.json" in out
    assert "allow:  config.json *.safetensors *.safetensors.index.json" in out
    assert "allow:  config.json *.safetensors *.safetensors.index.json preprocessor_config.json" in out
    assert out.count("the patterns above decide") == 5

    # no --listings: the Hub is asked; when it cannot answer, the patterns are printed
    def offline(repo):
        raise ConnectionError("offline")
    monkeypatch.setattr(dl, "hub_listing", offline)
    assert cli.main(["download", "wan22-i2v-a14b-gguf-q8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("(no listing: ConnectionError; the patterns above decide)") == 5

    # ... and when it answers, its listing is used
    monkeypatch.setattr(dl, "hub_listing", listing)
    assert cli.main(["download", "wan22-i2v-a14b-gguf-q8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 files (listing from the Hub):" in out and "14 files (listing from the Hub):" in out


def test_cli_download_fetches_and_checks(tmp_path, capsys, monkeypatch):
    fetch = FakeSnapshot(_fake_remote(tmp_path / "remote"))
    monkeypatch.setattr(dl, "snapshot_download", fetch)     # what download() calls by default
    cache = tmp_path / "weights"
    profile = "wan22-i2v-a14b-distill-bf16"
    assert cli.main(["download", profile, "--dir", str(cache), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"profile {profile}: all weights present in {cache}" in out
    assert sorted(c[0] for c in fetch.calls) == sorted(EXPECTED[profile])
    dl.check_weights_present(load_profile(profile, {"weights_dir": str(cache)}), profile)

    # a fetch that brings nothing: the command fails and names what is missing
    shutil.rmtree(cache)
    monkeypatch.setattr(dl, "snapshot_download", lambda *a, **k: "")
    assert cli.main(["download", profile, "--dir", str(cache), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"avatar-serve download {profile}" in err and DISTILL in err


def test_musetalk_lipsync_weights_get_their_files_only(tmp_path):
    """The lip-sync stage's MuseTalk source (two files of its repo, SD VAE and whisper-tiny as
    whole model repos): a stand-in config object, so this holds whatever else the stage grows."""
    from types import SimpleNamespace

    cache = str(tmp_path / "weights")
    base = load_profile("wan22-i2v-a14b-gguf-q8", {"weights_dir": cache})
    muse = SimpleNamespace(kind="musetalk", repo="TMElyralab/MuseTalk", unet="musetalkV15/unet.pth",
                           unet_config="musetalkV15/musetalk.json", vae="stabilityai/sd-vae-ft-mse",
                           whisper="openai/whisper-tiny")
    stages = SimpleNamespace(**{s: getattr(base.stages, s) for s in ("encoder", "high", "low", "decoder")},
                             lipsync=SimpleNamespace(weights=muse, weights_dir=cache))
    cfg = SimpleNamespace(stages=stages, weights_dir=cache)
    plans = {p.repo_id: p for p in dl.plan(cfg)}
    assert plans["TMElyralab/MuseTalk"].allow_patterns == ("musetalkV15/unet.pth", "musetalkV15/musetalk.json")
    whisper = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin",
               "tf_model.h5", "flax_model.msgpack", "preprocessor_config.json", "tokenizer.json"]
    # what WhisperFeatureExtractor / WhisperModel / AutoencoderKL.from_pretrained read: no other
    # weight format, no tokenizer or generation config, no README
    assert dl.select(whisper, plans["openai/whisper-tiny"]) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json"])
    vae = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors", "README.md"]
    assert dl.select(vae, plans["stabilityai/sd-vae-ft-mse"]) == sorted(
        ["config.json", "diffusion_pytorch_model.safetensors"])
    assert set(plans) == {DIFFUSERS, GGUF, "TMElyralab/MuseTalk", "stabilityai/sd-vae-ft-mse",
                          "openai/whisper-tiny"}

    # end to end: fetched into the cache, then checked (root-folder models need config + weights)
    remote = _fake_remote(tmp_path / "remote")
    for repo, files in {"TMElyralab/MuseTalk": ["musetalkV15/unet.pth", "musetalkV15/musetalk.json"],
                        "openai/whisper-tiny": whisper, "stabilityai/sd-vae-ft-mse": vae}.items():
        for f in files:
            (remote / repo.replace("/", "__") / f).parent.mkdir(parents=True, exist_ok=True)
            (remote / repo.replace("/", "__") / f).write_text(f)
    # unet.pth, musetalk.json, the VAE, whisper and whisper's preprocessor_config.json
    _assert_missing(cfg, "p", "TMElyralab/MuseTalk/musetalkV15/unet.pth", "(and 4 more)")
    paths = dl.download(cfg, progress=False, fetch=FakeSnapshot(remote))
    dl.check_weights_present(cfg, "p")
    (Path(paths["openai/whisper-tiny"]) / "preprocessor_config.json").unlink()
    _assert_missing(cfg, "p", "openai/whisper-tiny/preprocessor_config.json")
    (Path(paths["openai/whisper-tiny"]) / "model.safetensors").unlink()
    _assert_missing(cfg, "p", "openai/whisper-tiny/*.safetensors")


def test_downloaded_lipsync_files_are_enough_for_the_loader(tmp_path):
    """What the plan takes from the three lip-sync repos (no README, tokenizer, .bin / tf / flax
    copies) is all `lipsync.load_models` reads: tiny models in the published layout, fetched from a
    fake remote that also holds the files the plan must leave behind."""
    import torch
    from transformers import WhisperConfig, WhisperModel

    from deployments.config_weights import RandomWeights
    from deployments.models.musetalk.components import TINY, load_models

    extractor, encoder, unet, vae = load_models(RandomWeights(), torch.float32, torch.device("cpu"))
    remote = tmp_path / "remote"
    muse, vae_dir, whisper_dir = (remote / r.replace("/", "__") for r in (MUSETALK, SD_VAE, WHISPER))
    (muse / "musetalkV15").mkdir(parents=True)
    torch.save(unet.state_dict(), muse / "musetalkV15" / "unet.pth")
    (muse / "musetalkV15" / "musetalk.json").write_text(json.dumps(dict(unet.config)))
    vae.save_pretrained(vae_dir)
    whisper = WhisperModel(WhisperConfig(**TINY["whisper"]))
    whisper.encoder.load_state_dict(encoder.state_dict())
    whisper.save_pretrained(whisper_dir)
    extractor.save_pretrained(whisper_dir)
    for decoy in (muse / "musetalk" / "pytorch_model.bin", muse / "README.md", vae_dir / "README.md",
                  vae_dir / "diffusion_pytorch_model.bin", whisper_dir / "pytorch_model.bin",
                  whisper_dir / "tf_model.h5", whisper_dir / "tokenizer.json"):
        decoy.parent.mkdir(parents=True, exist_ok=True)
        decoy.write_text("not read")

    cache = tmp_path / "weights"
    cfg = load_profile("wan22-i2v-a14b-gguf-q8", {"weights_dir": str(cache)})
    paths = dl.download(cfg, progress=False, fetch=FakeSnapshot(remote))
    for repo in LIPSYNC:
        snap = Path(paths[repo])
        assert {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()} == LIPSYNC[repo]
    w = cfg.stages.lipsync
    _, encoder2, unet2, vae2 = load_models(w.weights, torch.float32, torch.device("cpu"), cfg.weights_dir)
    for a, b in ((encoder, encoder2), (unet, unet2), (vae, vae2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
