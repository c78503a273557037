"""The Ray Serve application: each stage class becomes a deployment, bound into one DAG, and the
ingress gets its HTTP skin (deployments/api/routes.py).

    serve run serve_config.yaml          (import_path: graph:app, args: {profile: tiny})

        Ingress ── Encoder ── DitExpert[high] ── DitExpert[low] ── Decoder ── LipSync
"""

# No `from __future__ import annotations` here: Ray Serve reads `app`'s parameter annotation at
# run time to validate serve_config.yaml's `args` into GraphArgs.
import logging
from typing import Any

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from deployments.api.routes import build_app
from deployments.config import GraphConfig, Placement
from deployments.decoder import Decoder
from deployments.dit_expert import DitExpert
from deployments.encoder import Encoder
from deployments.ingress import Ingress
from deployments.lipsync import LipSync
from deployments.media.audio import SAMPLE_RATE
from deployments.models.download import check_weights_present
from deployments.profiles import load_profile


class GraphArgs(BaseModel):
    """`args:` of serve_config.yaml."""

    profile: str = Field("tiny", description="a name in configs/ or a path to a profile YAML")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="merged into the profile, e.g. placement")


LOGGER = "avatar_serve"  # the stages' loggers are avatar_serve.<stage>


class ToServeLog(logging.Handler):
    """Hands the stages' log records to the replica's Serve logger (`ray.serve`: its file under
    the session's logs/serve/, each line tagged with deployment and replica, shown by the
    dashboard), at its level. Serve sets that logger up when the replica starts, after the worker
    process exists, so it is looked up per record. Flushed per record: Serve may buffer up to a
    thousand records (RAY_SERVE_THROUGHPUT_OPTIMIZED), and ours are a few per job or turn."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_log = logging.getLogger("ray.serve")
        if serve_log.isEnabledFor(record.levelno):
            serve_log.handle(record)
            for handler in serve_log.handlers:
                handler.flush()


def log_to_serve() -> None:
    """Route the stages' logs to Serve's replica log (each replica runs it before its stage is
    built). Without it their INFO records (job lifecycle, turn times, memory at start-up) were
    dropped: nothing configures the root logger in a Ray worker, and Python's last-resort handler
    passes WARNING and up only."""
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(isinstance(h, ToServeLog) for h in log.handlers):
        log.addHandler(ToServeLog())


# How the ingress's calls travel. Ray Serve sends a handle call either by reference (a Ray actor
# call: arguments and results in the object store, a response passed to the next stage as a
# reference, never through the ingress) or by value over gRPC, which its throughput-optimized
# mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1) makes the default: faster per call, but each message
# at most RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH bytes (4 MiB), and a response passed on is
# fetched into the caller first. The stages' calls carry conditioning, latents and clips (tens of
# MB at 480p): in that mode they failed ("AioRpcError") until they went by reference, as here,
# in every mode. A talk turn's messages are small (its PCM, then fMP4 pieces), so turns keep the
# cluster's transport, unless the longest audio the profile admits would not fit a message.
# `_by_reference` is DeploymentHandle.options' own switch (underscored in Ray 2.60, the only one).
PCM_BYTES_PER_SECOND = SAMPLE_RATE * 4  # float32 mono, as the ingress sends it


def grpc_message_limit() -> int:
    from ray.serve._private import constants

    return constants.RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH


def by_reference(handle):
    return None if handle is None else handle.options(_by_reference=True)


def turn_handle(lipsync, cfg: GraphConfig):
    """The handle a talk turn streams through: Ray's own while the longest admitted audio fits
    half a gRPC message (room for the rest of the call), else by reference like the stage calls."""
    if lipsync is None:
        return None
    turn_bytes = cfg.limits.max_audio_seconds * PCM_BYTES_PER_SECOND
    return lipsync if turn_bytes < grpc_message_limit() // 2 else by_reference(lipsync)


def replica_class(cls: type, ingress: bool = False) -> type:
    """`cls` as its replicas build it -- one subclass, made here, so Ray ships it by value. Every
    replica routes the stages' logs to Serve's before its stage is built. The ingress's replica
    also gets its handles with their transport decided (by reference; the turn handle by
    `turn_handle`) and its HTTP app (deployments/api/routes.py), which Serve asks for once the
    replica is built. (Ray's worker_process_setup_hook is applied from a job's runtime_env only,
    not from a deployment's, hence the subclass.)"""
    if not ingress:
        def __init__(self, *args, **kwargs):
            log_to_serve()
            cls.__init__(self, *args, **kwargs)

        return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__})

    def __init__(self, encoder, high, low, decoder, cfg: GraphConfig, lipsync=None):  # noqa: F811
        log_to_serve()
        cls.__init__(self, *map(by_reference, (encoder, high, low, decoder)), cfg,
                     lipsync=by_reference(lipsync), turn_lipsync=turn_handle(lipsync, cfg))

    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__,
                                       "__serve_build_asgi_app__": build_app})


def deployment(cls: type, name: str, placement: Placement, http: bool = False, env: dict | None = None):
    """Wrap a Ray-free stage class as a deployment with the placement from its config; `http`:
    the HTTP ingress (its FastAPI app served by Serve); `env`: more environment variables for
    its replicas."""
    actor = {"num_cpus": placement.num_cpus, "num_gpus": placement.num_gpus}
    if placement.accelerator_type:
        actor["accelerator_type"] = placement.accelerator_type
    if placement.resources:
        actor["resources"] = dict(placement.resources)
    env = dict(env or {})
    if placement.malloc_arena_max is not None:
        # In the worker's environment before it starts: glibc reads it once, at the first malloc.
        env["MALLOC_ARENA_MAX"] = str(placement.malloc_arena_max)
    if env:  # Serve merges these env_vars with an application-level runtime_env's
        actor["runtime_env"] = {"env_vars": env}
    if placement.autoscaling is not None:
        replicas = {"autoscaling_config": placement.autoscaling.model_dump()}
    else:
        replicas = {"num_replicas": placement.replicas}
    cls = replica_class(cls, ingress=http)
    if http:  # Serve's own ASGI wrapper on top: it serves what __serve_build_asgi_app__ returns
        cls = serve.ingress()(cls)
    return serve.deployment(cls, name=name, max_ongoing_requests=placement.max_ongoing_requests,
                            ray_actor_options=actor, **replicas)


def stage_env(cfg: GraphConfig, stage: str) -> dict:
    """A model stage's environment: torch.compile's cache folder (GraphConfig.compile_cache_dir),
    read by torch when it first compiles, in the replica."""
    folder = cfg.compile_cache_dir(stage)
    return {"TORCHINDUCTOR_CACHE_DIR": folder} if folder else {}


def deployment_name(cls: type, stage: str) -> str:
    """A stage's deployment name, from its class and its config key (the stage's one name in
    config, metrics, threads and logs): the class's name, plus the key where one class serves two
    stages (DitExpertHigh, DitExpertLow)."""
    return cls.__name__ if cls.__name__.lower() == stage else cls.__name__ + stage.title()


def build_from_config(cfg: GraphConfig) -> Application:
    def stage(cls: type, key: str):
        stage_cfg = getattr(cfg.stages, key)
        return deployment(cls, deployment_name(cls, key), stage_cfg.placement,
                          env=stage_env(cfg, key)).bind(stage_cfg, **cfg.stage_arguments(key))

    encoder = stage(Encoder, "encoder")
    high = stage(DitExpert, "high")
    low = stage(DitExpert, "low")
    decoder = stage(Decoder, "decoder")
    lipsync = stage(LipSync, "lipsync")
    ingress = deployment(Ingress, deployment_name(Ingress, "ingress"), cfg.stages.ingress.placement, http=True)
    return ingress.bind(encoder, high, low, decoder, cfg, lipsync)


def app(args: GraphArgs) -> Application:
    """Typed application builder for `serve run` / serve_config.yaml.

    Stops start-up with one clear error when a weight file of the profile is not on disk
    (serving never downloads; the error names `avatar-serve download PROFILE`)."""
    if not isinstance(args, GraphArgs):  # a plain mapping from a caller that did not validate
        args = GraphArgs.model_validate(args or {})
    cfg = load_profile(args.profile, args.overrides)
    check_weights_present(cfg, args.profile)
    return build_from_config(cfg)
