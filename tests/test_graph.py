"""graph.py, the builder Ray Serve imports (`graph:app`): GraphArgs from serve_config.yaml, the
missing-weights stop, and how each stage becomes a deployment (replica_class, deployment,
stage_env): its runtime_env, its logging into Serve's replica log, the ingress's handles. Nothing
is served here (tests/test_cluster.py serves the graph); profiles alone are in tests/test_config.py
and tests/test_profiles.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.profiles import load_profile


def test_builder_stops_on_missing_weights_naming_the_download_command(tmp_path):
    from deployments.common.errors import MissingWeightsError
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


def test_each_replica_process_starts_with_few_malloc_arenas():
    """MALLOC_ARENA_MAX goes into the replica's runtime_env (its environment before glibc reads
    it); a profile can change it or leave glibc's default with null."""
    from deployments.config import Placement
    from deployments.lipsync import LipSync
    from graph import deployment

    options = deployment(LipSync, "LipSync", Placement()).ray_actor_options
    assert options["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    cfg = load_profile("tiny", {"stages": {"lipsync": {"placement": {"malloc_arena_max": 4}},
                                           "decoder": {"placement": {"malloc_arena_max": None}}}})
    got = deployment(LipSync, "LipSync", cfg.stages.lipsync.placement).ray_actor_options
    assert got["runtime_env"]["env_vars"]["MALLOC_ARENA_MAX"] == "4"
    assert "runtime_env" not in deployment(LipSync, "Decoder", cfg.stages.decoder.placement).ray_actor_options
    with pytest.raises(ValidationError, match="malloc_arena_max"):
        load_profile("tiny", {"stages": {"lipsync": {"placement": {"malloc_arena_max": 0}}}})


def test_the_stages_info_logs_reach_the_replicas_serve_log():
    """graph.log_to_serve (run by each replica before its stage is built) hands avatar_serve.*
    records to the `ray.serve` logger Serve set up for the replica, at that logger's level,
    flushed; the deployment's class is the stage's own, subclassed to run it first."""
    import logging

    from deployments.config import Placement
    from deployments.lipsync import LipSync
    from graph import deployment, log_to_serve

    served = deployment(LipSync, "LipSync", Placement()).func_or_class
    assert issubclass(served, LipSync) and served is not LipSync and served.__name__ == "LipSync"
    assert served.__init__ is not LipSync.__init__
    package, serve_log = logging.getLogger("avatar_serve"), logging.getLogger("ray.serve")
    saved = (package.level, package.propagate, list(package.handlers), serve_log.level, list(serve_log.handlers))
    flushed = []

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record.getMessage())

        def flush(self):
            flushed.append(len(self.records))

    kept = Kept()
    try:
        log_to_serve()
        log_to_serve()  # a second call adds no second handler
        assert [type(h).__name__ for h in package.handlers].count("ToServeLog") == 1
        serve_log.handlers[:] = [kept]  # what Serve installs when the replica starts
        serve_log.setLevel(logging.INFO)
        logging.getLogger("avatar_serve.ingress").info("turn on a: first byte %.3f s", 0.2)
        logging.getLogger("avatar_serve.queue").debug("not at INFO")
        serve_log.setLevel(logging.WARNING)  # a deployment's logging_config raises the level
        logging.getLogger("avatar_serve.lipsync").info("dropped at WARNING")
        logging.getLogger("avatar_serve.lipsync").warning("kept at WARNING")
        assert kept.records == ["turn on a: first byte 0.200 s", "kept at WARNING"]
        assert flushed == [1, 2]
    finally:
        package.setLevel(saved[0])
        package.propagate = saved[1]
        package.handlers[:] = saved[2]
        serve_log.setLevel(saved[3])
        serve_log.handlers[:] = saved[4]


def test_the_ingress_sends_stage_calls_by_reference_and_turns_by_the_clusters_transport(tmp_path, monkeypatch):
    """In a replica the ingress's stage handles go by reference (tensors through the object store,
    whatever transport the cluster defaults to); talk turns keep the handle as Ray made it while
    the longest audio the profile admits fits half a gRPC message, else by reference too."""
    import graph
    from deployments.ingress import Ingress

    class Handle:
        def __init__(self, name, by_reference=None):
            self.name, self.by_reference = name, by_reference

        def options(self, **options):
            return Handle(self.name, options.get("_by_reference"))

    stages = ("encoder", "high", "low", "decoder", "lipsync")
    cfg = load_profile("tiny", {"serving": {"storage_dir": str(tmp_path)}, "limits": {"max_audio_seconds": 10}})
    served = graph.replica_class(Ingress, ingress=True)
    assert issubclass(served, Ingress) and served.__name__ == "Ingress"
    assert served.__serve_build_asgi_app__ is graph.build_app  # Serve asks it for the HTTP app

    def build(limit: int) -> Ingress:
        monkeypatch.setattr(graph, "grpc_message_limit", lambda: limit)
        handles = {name: Handle(name) for name in stages}
        ingress = served(*(handles[n] for n in stages[:4]), cfg, handles["lipsync"])
        assert [getattr(ingress, n).name for n in stages] == list(stages)
        assert all(getattr(ingress, n).by_reference is True for n in stages)
        return ingress

    assert build(4 * 1024 * 1024).turn_lipsync.by_reference is None  # 10 s of PCM: 640 KB
    assert build(1024 * 1024).turn_lipsync.by_reference is True
    without = served(*(Handle(n) for n in stages[:4]), cfg, None)
    assert without.lipsync is None and without.turn_lipsync is None


def test_each_model_stage_compiles_into_a_cache_beside_the_jobs(tmp_path):
    """torch.compile's cache folder (TORCHINDUCTOR_CACHE_DIR) goes into each model stage's replica
    environment, by default under the storage root, so a restarted replica finds its compiled
    kernels; null leaves torch's own default; the ingress gets none."""
    from deployments.config import MODEL_STAGES
    from deployments.dit_expert import DitExpert
    from graph import deployment, stage_env

    cfg = load_profile("tiny", {"serving": {"storage_dir": str(tmp_path)},
                                "stages": {"decoder": {"compile_cache_dir": None}}})
    want = str(tmp_path / "compile-cache")
    assert {n: cfg.compile_cache_dir(n) for n in MODEL_STAGES} == {
        n: None if n == "decoder" else want for n in MODEL_STAGES}
    assert cfg.stages.high.compile_cache_dir is None  # derived when asked, not written into the config
    own = load_profile("tiny", {"stages": {"high": {"compile_cache_dir": str(tmp_path / "mine")}}})
    assert own.compile_cache_dir("high") == str(tmp_path / "mine")
    got = deployment(DitExpert, "DitExpertHigh", cfg.stages.high.placement, env=stage_env(cfg, "high"))
    assert got.ray_actor_options["runtime_env"]["env_vars"] == {"TORCHINDUCTOR_CACHE_DIR": want,
                                                                  "MALLOC_ARENA_MAX": "2"}
    assert stage_env(cfg, "decoder") == {}
