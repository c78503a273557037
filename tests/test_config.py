import pytest
from pydantic import ValidationError

from deployments.config import SamplerConfig, load_profile


def test_tiny_profile_is_cpu_friendly_and_complete(tiny_cfg):
    assert tiny_cfg.name == "tiny"
    for name in ("encoder", "high", "low", "decoder"):
        stage = getattr(tiny_cfg.stages, name)
        assert stage.weights.kind == "random" and stage.placement.num_gpus == 0
        assert stage.placement.num_cpus <= 0.1  # a 2-core machine must fit every replica
    assert tiny_cfg.stages.high.role == "high" and tiny_cfg.stages.low.role == "low"


def test_overrides_merge_deeply():
    cfg = load_profile("tiny", {"stages": {"high": {"placement": {"num_gpus": 1}}}, "weights_dir": "/w"})
    assert cfg.stages.high.placement.num_gpus == 1
    assert cfg.stages.high.placement.num_cpus == 0.1  # untouched siblings survive the merge
    assert cfg.stages.low.placement.num_gpus == 0
    assert cfg.stages.decoder.weights_dir == "/w"  # propagated to every model stage


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


def test_builder_stops_on_missing_weights_naming_the_download_command(tmp_path):
    from deployments.models.hub import MissingWeightsError
    from graph import GraphArgs, app

    with pytest.raises(MissingWeightsError) as exc:
        app(GraphArgs(profile="wan22-i2v-a14b-distill-fp8", overrides={"weights_dir": str(tmp_path)}))
    assert "avatar-serve download wan22-i2v-a14b-distill-fp8" in str(exc.value)
    assert "scaled_fp8_e4m3" in str(exc.value)


def test_builder_accepts_serve_config_args_as_a_mapping():
    from ray.serve import Application

    from graph import GraphArgs, app

    assert isinstance(app({"profile": "tiny"}), Application)
    # Ray Serve validates serve_config.yaml's args by the builder's annotation, read at run time.
    assert app.__annotations__["args"] is GraphArgs


def test_one_ingress_replica_owns_the_job_store():
    with pytest.raises(ValidationError, match="replicas must be 1"):
        load_profile("tiny", {"stages": {"ingress": {"placement": {"replicas": 2}}}})
