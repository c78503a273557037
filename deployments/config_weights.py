"""Weights sources: where a stage's model weights come from (the `weights:` of each stage), and
the LoRAs an expert applies at start-up (`loras:` of stages.high / stages.low).

The profile picks a source by its `kind`; the stages' loaders (deployments/models/wan/components.py,
deployments/models/musetalk/components.py) and `avatar-serve download`
(deployments/models/download.py) read it. Serving never downloads: a source names files that
`avatar-serve download` put in the Hugging Face cache (`weights_dir`) or a local path.

`Strict`, the base of every configuration model, lives here because this module imports no other
configuration module (deployments/config_serving.py and deployments/config.py build on it).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A configuration model: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# What a Hub repo id or a local folder means here, said once for the descriptions below.
_REPO = ("a Hugging Face Hub repo id (read from the local cache, never downloaded while serving) "
         "or a local folder")


class RandomWeights(Strict):
    """Random weights built in code (no files): `tiny` for tests and the demo; full size for speed
    measurements (speed does not depend on weight values): `a14b` for the Wan2.2 stages, `full`
    (MuseTalk's published sizes) for lip-sync."""

    kind: Literal["random"] = Field("random", description="Selects this source.")
    arch: Literal["tiny", "a14b", "full"] = Field("tiny", description=(
        "Model sizes: `tiny` (runs on a CPU), `a14b` (Wan2.2-I2V-A14B's sizes, for the Wan stages) or "
        "`full` (MuseTalk's sizes, for lip-sync)."))
    seed: int = Field(0, description=(
        "Seed of the random weights; each model of the stage draws from its own offset of it."))


class DiffusersWeights(Strict):
    """A diffusers-format repository: a Hub repo id (read from the local cache / `weights_dir`,
    never downloaded while serving) or a local folder. `subfolder` overrides the component's
    usual folder (`text_encoder`, `vae`, `transformer`, `transformer_2`)."""

    kind: Literal["diffusers"] = Field("diffusers", description="Selects this source.")
    path: str = Field(description=f"The diffusers repository: {_REPO}.")
    subfolder: str | None = Field(None, description=(
        "The folder of the repository this stage loads; None: the component's usual folder "
        "(`text_encoder` and `vae` for the encoder, `vae` for the decoder, `transformer` for the "
        "high-noise expert, `transformer_2` for the low-noise one)."))


# diffusers' folders of the two experts in a Wan2.2 repository (and of their configs).
EXPERT_SUBFOLDERS = {"high": "transformer", "low": "transformer_2"}


def expert_subfolder(role: str) -> str:
    """diffusers names the high-noise expert `transformer` and the low-noise one `transformer_2`."""
    try:
        return EXPERT_SUBFOLDERS[role]
    except KeyError:
        raise ValueError(f"expert role must be 'high' or 'low', got {role!r}") from None


class WanSafetensorsWeights(Strict):
    """One expert as a single safetensors file with original Wan key names
    (`blocks.N.self_attn.q.weight`, ...): the lightx2v distilled bf16 files, or fp8 e4m3 files
    with a per-output-channel `X.weight_scale` next to each quantised `X.weight`.
    `config` names the diffusers repo/folder whose `transformer/config.json` describes it."""

    kind: Literal["wan_safetensors"] = Field("wan_safetensors", description="Selects this source.")
    repo: str | None = Field(None, description=(
        f"The repository holding `filename`: {_REPO}; None: `filename` is a local path."))
    filename: str = Field(description="The expert's safetensors file, inside `repo` (or a local path).")
    config: str = Field(description=(
        "The diffusers repository (Hub repo id or local folder) whose `transformer*/config.json` "
        "describes the expert; only those config files are read from it."))


class GGUFWeights(Strict):
    """One expert as a GGUF file (QuantStack layout, original Wan key names), loaded through
    diffusers' GGUF quantization with the diffusers config passed explicitly (`config`)."""

    kind: Literal["gguf"] = Field("gguf", description="Selects this source.")
    repo: str | None = Field(None, description=(
        f"The repository holding `filename`: {_REPO}; None: `filename` is a local path."))
    filename: str = Field(description="The expert's GGUF file, inside `repo` (or a local path).")
    config: str = Field(description=(
        "The diffusers repository (Hub repo id or local folder) whose `transformer*/config.json` "
        "describes the expert; only those config files are read from it."))


class MuseTalkWeights(Strict):
    """The MuseTalk lip-sync models in their published layout: the v1.5 UNet as a plain torch
    state dict (`unet`) plus its diffusers config (`unet_config`), both files of `repo` (a Hub
    repo id or a local folder), the SD VAE (`vae`) and whisper-tiny (`whisper`), each a Hub repo
    id or a local diffusers / transformers folder. Resolved through deployments.models.hub, never
    downloaded while serving."""

    kind: Literal["musetalk"] = Field("musetalk", description="Selects this source.")
    repo: str = Field("TMElyralab/MuseTalk", description=(
        f"The repository holding `unet` and `unet_config`: {_REPO}."))
    unet: str = Field("musetalkV15/unet.pth", description="The UNet's torch state dict, a file of `repo`.")
    unet_config: str = Field("musetalkV15/musetalk.json", description=(
        "The UNet's diffusers config, a file of `repo`."))
    vae: str = Field("stabilityai/sd-vae-ft-mse", description=f"The Stable Diffusion VAE: {_REPO}.")
    whisper: str = Field("openai/whisper-tiny", description=(
        f"whisper-tiny, whose encoder gives the audio features: {_REPO}."))
    face_parser: str | None = Field(None, description=(
        "The BiSeNet face parser (`79999_iter.pth`) that `blend_mask: face_parsing` needs: a local "
        "file, or a path inside `repo` when that is a local folder. It is not on MuseTalk's Hub repo "
        "(MuseTalk's own script fetches it elsewhere), so `avatar-serve download` cannot fetch it. "
        "None: not set."))
    s3fd: str | None = Field(None, description=(
        "The S3FD face detector (face_alignment's `s3fd-619a316812.pth`, a local path) that "
        "`face_detector: landmarks` needs; not on MuseTalk's Hub repo either. None: not set."))
    fan: str | None = Field(None, description=(
        "The 2D-FAN landmark model (face_alignment's `2DFAN4-11f355bf06.pth.tar`, a local path) that "
        "`face_detector: landmarks` needs; not on MuseTalk's Hub repo either. None: not set."))


WeightsSource = Annotated[Union[RandomWeights, DiffusersWeights, WanSafetensorsWeights, GGUFWeights,
                                MuseTalkWeights],
                          Field(discriminator="kind")]


class StartupLora(Strict):
    """A LoRA an expert applies at start-up and keeps for the life of the replica: part of the
    profile's recipe (the lightx2v 4-step distill LoRAs on base Wan2.2 experts), not an admin
    LoRA. `filename` is a file of `repo` (a Hub repo id, fetched by `avatar-serve download`, or a
    local folder); with `repo` None it is itself a local path.

    Applied after the weights load and before warm-up (deployments/models/wan/lora_match.py
    `prepare_lora`, lora_fuse.py `fuse_deltas`): low-rank pairs become an unfused adapter kept
    active at `strength`; full deltas (`diff` on a weight, `diff_b` on a bias, `diff_m` on a
    modulation, norm `diff`s) are added to the weights they name (times `strength`, as LightX2V
    does). Every tensor of the file is applied, or skipped and logged (`skip_absent` below), or
    start-up fails naming it; admin LoRA calls can neither deactivate nor remove it."""

    repo: str | None = Field(None, description=(
        "The repository holding `filename`: a Hub repo id (fetched by `avatar-serve download`) or a "
        "local folder; None: `filename` is a local path."))
    filename: str = Field(min_length=1, description=(
        "The LoRA file (safetensors, or a torch file of tensors), inside `repo` (or a local path)."))
    strength: float = Field(1.0, ge=-10, le=10, description="The factor the LoRA is applied with.")
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description=(
        "The adapter's name in /v1/admin/loras listings; None: the file name without its extension."))
    skip_absent: list[str] = Field(default_factory=list, description=(
        "fnmatch patterns of the file's keys that may name parts this expert does not have: those "
        "are skipped (logged as a warning with their count) instead of stopping start-up. For "
        "Wan2.1's image cross-attention (`*.k_img.*`, `*.v_img.*`, `*.norm_k_img.*`), which Wan2.2 "
        "I2V experts lack and LightX2V skips too. A matching key that names a part the expert has is "
        "applied as usual; all-zero tensors for absent parts are skipped without a pattern (they "
        "change nothing)."))

    @property
    def adapter_name(self) -> str:
        """`name`, else the file's stem with characters outside [A-Za-z0-9_-] made `_` (peft's
        adapter names become module names, which may not contain dots)."""
        if self.name:
            return self.name
        stem = self.filename.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in stem)[:64] or "lora"
