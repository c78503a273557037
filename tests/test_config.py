"""Profiles as configuration: loading by name or path, overrides, `extends`, what validation
refuses, the values derived from them. The shipped profiles' own settings are in
tests/test_profiles.py; graph.py's use of a profile in tests/test_graph.py."""

import textwrap

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import SamplerConfig
from deployments.profiles import load_profile


def test_tiny_profile_is_cpu_friendly_and_complete(tiny_cfg):
    assert tiny_cfg.name == "tiny"
    for name in ("encoder", "high", "low", "decoder"):
        stage = getattr(tiny_cfg.stages, name)
        assert stage.weights.kind == "random" and stage.placement.num_gpus == 0
        assert stage.placement.num_cpus <= 0.1  # a 2-core machine must fit every replica
    # An expert's role is its slot, given to the stage by the graph, not a setting of the expert.
    assert tiny_cfg.stage_arguments("high")["role"] == "high" and tiny_cfg.stage_arguments("low")["role"] == "low"
    assert "role" not in tiny_cfg.stages.high.model_fields_set and "role" not in type(tiny_cfg.stages.high).model_fields


def test_overrides_merge_deeply():
    cfg = load_profile("tiny", {"stages": {"high": {"placement": {"num_gpus": 1}}}, "weights_dir": "/w"})
    assert cfg.stages.high.placement.num_gpus == 1
    assert cfg.stages.high.placement.num_cpus == 0.1  # untouched siblings survive the merge
    assert cfg.stages.low.placement.num_gpus == 0
    # Where the weights are is the graph's, given to every model stage as it is built.
    assert all(cfg.stage_arguments(n)["weights_dir"] == "/w" for n in ("encoder", "high", "low", "decoder", "lipsync"))
    assert "weights_dir" not in cfg.stage_arguments("ingress")


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ValueError, match="known profiles: .*tiny"):
        load_profile("nope")


def test_typos_in_a_profile_are_refused():
    with pytest.raises(ValidationError, match="plaecment"):
        load_profile("tiny", {"stages": {"encoder": {"plaecment": {}}}})


@pytest.mark.parametrize("bad", [
    dict(scheduler="unipc", sigmas=[1.0, 0.5], num_inference_steps=2),  # sigmas need euler
    dict(scheduler="euler", sigmas=[1.0, 0.5], num_inference_steps=3),  # length mismatch
    dict(boundary_ratio=0.0),
])
def test_sampler_config_rejects_inconsistent_settings(bad):
    with pytest.raises(ValidationError):
        SamplerConfig(**bad)


def test_one_ingress_replica_owns_the_job_store():
    with pytest.raises(ValidationError, match="replicas must be 1"):
        load_profile("tiny", {"stages": {"ingress": {"placement": {"replicas": 2}}}})


def test_code_defaults_are_the_tiny_profile(tiny_cfg):
    """The embedded default is the code's defaults: tiny.yaml holds only its name."""
    from deployments.config import GraphConfig
    from deployments.profiles import CONFIG_DIR

    assert set(yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())) == {"name", "description"}
    defaults = GraphConfig(name="x")
    assert (defaults.defaults.width, defaults.sampler.num_inference_steps, defaults.limits.max_width) == (32, 4, 256)
    assert (tiny_cfg.stages.lipsync.batch_size, tiny_cfg.limits.max_audio_seconds) == (8, 30)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_merges_the_base_and_another_kind_of_weights_replaces_it(tmp_path):
    write(tmp_path / "_base.yaml", """
        stages:
          high: {weights: {kind: diffusers, path: some/repo}, placement: {num_gpus: 1, num_cpus: 2}}
        sampler: {num_inference_steps: 8}
        """)
    child = write(tmp_path / "child.yaml", """
        extends: _base.yaml
        name: child
        stages:
          high: {weights: {kind: random}, placement: {num_gpus: 0}}
        """)
    cfg = load_profile(str(child))
    assert cfg.stages.high.weights.kind == "random"  # replaced whole (no stray `path`)
    assert (cfg.stages.high.placement.num_gpus, cfg.stages.high.placement.num_cpus) == (0, 2)  # merged
    assert cfg.sampler.num_inference_steps == 8
    grandchild = write(tmp_path / "grandchild.yaml", """
        extends: child.yaml
        name: grandchild
        stages: {high: {weights: {seed: 3}}}
        """)
    high = load_profile(str(grandchild)).stages.high
    assert (high.weights.kind, high.weights.seed, high.placement.num_cpus) == ("random", 3, 2)


def test_bases_are_not_servable_and_circles_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is a base for other profiles"):
        load_profile("_wan22-a14b")
    write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(ValueError, match="circle"):
        load_profile(str(tmp_path / "a.yaml"))
    with pytest.raises(ValueError, match="unknown profile 'nowhere'"):
        load_profile(str(write(tmp_path / "c.yaml", "extends: nowhere\nname: c\n")))


def test_the_audio_limit_is_set_once_in_limits():
    cfg = load_profile("tiny", {"limits": {"max_audio_seconds": 7}})
    assert cfg.limits.max_audio_seconds == cfg.stage_arguments("lipsync")["max_audio_seconds"] == 7
    with pytest.raises(ValueError, match="limits.max_audio_seconds"):
        load_profile("tiny", {"stages": {"lipsync": {"max_audio_seconds": 7}}})


def test_random_archs_fit_their_stage():
    with pytest.raises(ValidationError, match="do not fit this stage"):
        load_profile("tiny", {"stages": {"lipsync": {"weights": {"kind": "random", "arch": "a14b"}}}})
    with pytest.raises(ValidationError, match="do not fit this stage"):
        load_profile("tiny", {"stages": {"high": {"weights": {"kind": "random", "arch": "full"}}}})


def test_several_lipsync_replicas_need_a_shared_avatar_folder(tmp_path):
    scaling = {"autoscaling": {"min_replicas": 1, "max_replicas": 2}}
    with pytest.raises(ValidationError, match="avatar_cache_dir"):  # a memory-only cache, asked for
        load_profile("tiny", {"stages": {"lipsync": {"placement": scaling, "avatar_cache_dir": None}}})
    cfg = load_profile("tiny", {"stages": {"lipsync": {"placement": scaling, "avatar_cache_dir": str(tmp_path)}}})
    assert cfg.max_talk_turns == 2 * cfg.stages.lipsync.placement.max_ongoing_requests
    # By default the folder is beside the jobs, so the replicas share it.
    cfg = load_profile("tiny", {"stages": {"lipsync": {"placement": scaling}}, "serving": {"storage_dir": str(tmp_path)}})
    assert cfg.stages.lipsync.avatar_cache_dir == str(tmp_path / "avatars")


def test_jobs_persist_by_default_under_the_storage_root(monkeypatch, tmp_path):
    monkeypatch.setenv("AVATAR_SERVE_STORAGE", str(tmp_path))
    assert load_profile("tiny").serving.storage_dir == str(tmp_path / "tiny")
    assert load_profile("tiny", {"serving": {"storage_dir": "/x"}}).serving.storage_dir == "/x"


def test_a_placement_preset_runs_enough_jobs_at_once_to_keep_its_gpus_busy():
    """A job is in one GPU stage at a time, so a preset with four GPU stages apart needs four
    jobs at once to keep them busy (the ingress default of 2 would leave half idle); a profile's
    own serving.max_running_jobs wins."""
    from deployments.profiles import PLACEMENTS, RUNNING_JOBS

    assert set(RUNNING_JOBS) == set(PLACEMENTS)
    got = {preset: load_profile("random-a14b", {"placement": preset}).serving.max_running_jobs
           for preset in PLACEMENTS}
    assert got == {"per-stage": 4, "four-gpu": 4, "two-gpu": 3, "single-gpu": 2}
    own = load_profile("random-a14b", {"placement": "per-stage", "serving": {"max_running_jobs": 1}})
    assert own.serving.max_running_jobs == 1
    assert load_profile("tiny").serving.max_running_jobs == 2  # no preset: the ingress default




def test_an_ingress_placement_given_in_part_keeps_the_ingress_defaults():
    """Pinning the ingress to a node (resources only) must not drop its 1024 request slots to a
    model stage's default of 4, which would leave /healthz no room beside the admission caps."""
    cfg = load_profile("tiny", {"stages": {"ingress": {"placement": {"resources": {"head": 1}}}}})
    placement = cfg.stages.ingress.placement
    assert placement.max_ongoing_requests == 1024 and placement.resources == {"head": 1.0}
    assert placement.num_gpus == 0
    assert load_profile("tiny", {"stages": {"ingress": {"placement": {"max_ongoing_requests": 2048}}}}
                        ).stages.ingress.placement.max_ongoing_requests == 2048
