"""The ingress's settings: what a request gets by default, the bounds it must stay in, and how
jobs, results, API keys and LoRA folders are served (`defaults`, `limits` and `serving` of a
profile). The root `GraphConfig` (deployments/config.py) holds one of each."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from deployments.config_weights import Strict

# What an API key may hold: visible ASCII, no spaces or commas (commas separate keys in a variable).
KEY_CHARS = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


class GenerationDefaults(Strict):
    """Values a request gets when it leaves a field out."""

    width: int = Field(32, description=(
        "Clip width in pixels for a request without `size`; with an image and no `size`, the clip "
        "takes the image's aspect at this width x height pixel count."))
    height: int = Field(32, description="Clip height in pixels for a request without `size` (see width).")
    num_frames: int = Field(9, description=(
        "Frames of a clip for a request without `num_frames` or `seconds` (4k+1)."))
    fps: int = Field(16, description=(
        "Frame rate of the clip (and of `seconds` -> frames) for a request without `fps`."))
    negative_prompt: str = Field("", description=(
        "Negative prompt for a request without one. \"\" leaves the choice to the encoder's "
        "`default_negative_prompt`."))


class Limits(Strict):
    """Per-profile bounds checked at the ingress before any stage is called."""

    max_width: int = Field(256, description="Largest clip width in pixels.")
    max_height: int = Field(256, description="Largest clip height in pixels.")
    max_pixels: int = Field(256 * 256, description="Largest clip area, width x height, in pixels.")
    max_frames: int = Field(33, description="Most frames of a clip.")
    max_steps: int = Field(20, description="Most denoising steps a request may ask for.")
    max_prompt_chars: int = Field(2000, description="Longest prompt, in characters.")
    max_image_bytes: int = Field(10 * 1024 * 1024, description="Largest input image upload, in bytes.")
    max_image_pixels: int | None = Field(None, ge=4, description=(
        "Input images with more pixels are refused from their header, before decoding; None: 64 x "
        "max_pixels. Images larger than twice the largest clip are shrunk while decoding."))
    max_audio_bytes: int = Field(50 * 1024 * 1024, description="Largest audio upload, in bytes.")
    max_audio_seconds: float = Field(30.0, gt=0, description=(
        "Longest speech, in seconds (a talk turn's, or a video job's audio): longer audio is "
        "refused while decoding, at the ingress and again by the lip-sync stage."))

    @property
    def image_pixels(self) -> int:
        return self.max_image_pixels or 64 * self.max_pixels


class LiveConfig(Strict):
    """Live sessions (`GET /v1/avatars/{id}/live`, a WebSocket): audio in as it is produced, one
    continuous lip-synced fragmented MP4 out at real-time pace."""

    max_sessions: int | None = Field(None, ge=1, description=(
        "Live sessions open at once; one more is refused (close code 4429 with a retry hint). None: "
        "what the lip-sync stage can take, its (maximum) replicas x max_ongoing_requests."))
    retry_after_s: int = Field(5, ge=1, description="The retry hint, in seconds, of a session refused at capacity.")
    fragment_frames: int = Field(2, ge=1, le=25, description=(
        "Idle frames per fMP4 fragment: speech can start after any fragment, so smaller fragments "
        "start it sooner, at a few hundred bytes of overhead each."))
    idle_gop_frames: int = Field(12, ge=1, le=250, description=(
        "Frames per GOP of idle video (encoded once per avatar and reused); an IDR starts each."))
    start_margin_frames: int = Field(3, ge=0, le=50, description=(
        "Idle frames played between the moment an utterance's first frames are requested and its "
        "first frame (time to render them); speech continues the base clip's cycle from that frame, "
        "so it is fixed in advance. Too small: the stream waits for the frames (a stall)."))
    lead_s: float = Field(0.08, ge=0, le=5, description=(
        "How far ahead of real time the stream is sent: fragments whose media time is further ahead "
        "wait. Larger absorbs network jitter; an interrupt cannot recall what was sent."))
    render_ahead_s: float = Field(2.0, gt=0, le=60, description=(
        "Speech rendered but not yet sent, at most (a voice agent's TTS may send audio faster than "
        "real time; rendering waits beyond this)."))
    max_buffered_audio_s: float = Field(60.0, gt=0, description=(
        "Audio received but not yet played, at most, in seconds; past it the session ends (4413)."))
    max_chunk_bytes: int = Field(1024 * 1024, ge=1024, description="Largest audio message, in bytes (1009 beyond).")
    max_session_s: float = Field(3600.0, gt=0, description="Longest session, in seconds (then closed, 4408).")
    send_buffer_s: float = Field(5.0, gt=0, description=(
        "Media the client has not read yet, at most, in seconds of stream: a client that reads more "
        "slowly than real time is told (an error event) and closed (4408), not buffered without end."))
    utterance_gap_s: float = Field(1.0, gt=0, description=(
        "An utterance without end_of_utterance ends once no audio has come for this long."))
    stats_every_s: float = Field(1.0, gt=0, description="How often a `stats` event is sent, in seconds.")


class AdmissionConfig(Strict):
    """Caps on the requests that hold the ingress long (deployments/api/admission.py): one more is
    refused at once, 429 when its client holds its share, 503 when the ingress holds the total,
    with Retry-After. A client is the address Ray Serve's proxy saw (README, Floods)."""

    max_event_streams: int | None = Field(256, ge=1, description=(
        "Event and MP4 streams (GET /v1/videos/{id}/events, .../stream) open at once; one more answers "
        "503. None: no cap."))
    max_event_streams_per_client: int | None = Field(64, ge=1, description=(
        "Event and MP4 streams one client may hold open; one more answers 429. None: no cap. A backend "
        "that follows its users' jobs is one client: leave it room."))
    max_uploads: int | None = Field(64, ge=1, description=(
        "Requests whose body is still arriving, at once; one more answers 503 before its body is read. "
        "None: no cap."))
    max_uploads_per_client: int | None = Field(16, ge=1, description=(
        "Requests with a body still arriving that one client may have; one more answers 429. None: no cap."))
    max_talk_turns_per_client: int | None = Field(None, ge=1, description=(
        "Talk turns (POST /v1/avatars/{id}/speech) one client may have at once, counted from the "
        "request's start; one more answers 429. The total is serving.max_talk_turns. None (the "
        "default): no cap of its own -- a voice-chat backend sends every one of its users' turns from "
        "one address, so a per-client cap would cap the product; set one where clients are people."))
    retry_after_s: int = Field(5, ge=1, description="Retry-After, in seconds, of these refusals.")
    body_min_bytes_per_s: int = Field(8192, ge=1, description=(
        "After body_grace_s, a request body must have arrived at this many bytes a second on average "
        "(since the request came), or the request gets 408: a trickled body is cut off."))
    body_grace_s: float = Field(5.0, gt=0, description=(
        "Seconds a request body may take before body_min_bytes_per_s applies."))

    def held_at_most(self, talk_turns: int, live_sessions: int) -> int | None:
        """Requests these caps let hold the ingress at once (None: unbounded)."""
        caps = (self.max_event_streams, self.max_uploads)
        return None if None in caps else sum(caps) + talk_turns + live_sessions


class WebhookConfig(Strict):
    """Completion webhooks: a video job that names a `callback_url` gets its record POSTed there,
    signed, once it ends (deployments/api/webhooks.py; README: Completion webhooks)."""

    secret: str | None = Field(None, min_length=16, repr=False, description=(
        "The HMAC-SHA256 key that signs every delivery. Like API keys it may come from the profile, "
        "from the environment variable `secret_env` or from the file `secret_file`, read once where "
        "the application is built, and travels to the ingress inside this config. None from every "
        "source: webhooks are off, and a request naming callback_url gets 422."))
    secret_env: str | None = Field("AVATAR_SERVE_WEBHOOK_SECRET", description=(
        "An environment variable holding the secret (see secret). Set but blank: start-up stops."))
    secret_file: str | None = Field(None, description=(
        "A file holding the secret (its first line that is not a '#' comment). Set but missing, "
        "unreadable or empty: start-up stops."))
    allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts a callback_url may name: exact names or IP literals, or '*.example.com' for any name "
        "under example.com. Empty: any host whose addresses are all public."))
    allow_private: bool = Field(False, description=(
        "Allow destinations on loopback, private, link-local, shared, multicast or reserved addresses "
        "(the host's addresses are checked when the job is submitted and again before every attempt, "
        "and the request goes to the address checked). Off by default: a client could otherwise "
        "reach services inside the network through the ingress."))
    max_attempts: int = Field(8, ge=1, le=20, description=(
        "Attempts per delivery at most; network errors, timeouts, 408, 429 and 5xx answers are retried."))
    timeout_s: float = Field(10.0, gt=0, le=300, description=(
        "One attempt's limit, in seconds: resolving the host, connecting, sending and the answer's status line."))
    backoff_s: float = Field(2.0, gt=0, description=(
        "The wait before the second attempt, in seconds; it doubles with each further one (plus up to "
        "10 % jitter), up to max_backoff_s."))
    max_backoff_s: float = Field(300.0, gt=0, description="The longest wait between two attempts, in seconds.")
    max_total_s: float = Field(900.0, gt=0, description=(
        "No attempt starts later than this many seconds after the first one: then the delivery has failed "
        "(an ingress that resumes a delivery after a restart counts afresh)."))


class ServingConfig(Strict):
    """The ingress: jobs, limits, storage, auth."""

    job_timeout_s: float = Field(1800.0, gt=0, description=(
        "Deadline of one job once it runs, in seconds (time in the queue not counted); past it the "
        "job fails with a timeout error and its stages are released."))
    stage_retries: int = Field(1, ge=0, le=3, description=(
        "How many times a stage of one job runs again when its replica dies mid-job, from the "
        "stage's kept input (the conditioning, the latents after the high expert); the clip is "
        "byte-identical to an undisturbed run. 0: a dead replica fails the job."))
    max_running_jobs: int = Field(2, ge=1, description=(
        "Jobs that run at once (the stages pipeline them). A `placement` preset sets this to what "
        "keeps its GPUs busy unless the profile sets it."))
    max_queued_jobs: int = Field(16, ge=0, description=(
        "Jobs that may wait behind the running ones; past max_running_jobs + max_queued_jobs, "
        "POST /v1/videos answers 429 with Retry-After."))
    retry_after_s: int = Field(10, ge=1, description=(
        "Retry-After, in seconds, of a 429 for a full job queue."))
    requeue_max_jobs: int | None = Field(None, ge=0, description=(
        "After a restart, how many of the video jobs and avatar preparations the previous ingress "
        "left queued or running are queued again (oldest submission first; each at most once more: "
        "one interrupted twice fails with `interrupted`). The rest fail with `interrupted` and say "
        "why. None: the queue's capacity, max_running_jobs + max_queued_jobs; 0: none, every "
        "unfinished job fails."))
    max_talk_turns: int | None = Field(None, ge=1, description=(
        "Talk turns streaming at once; one more answers 429 with Retry-After (turn_retry_after_s) "
        "instead of waiting, since a live turn that starts late is no use. None: what the lip-sync "
        "stage can take, its (maximum) replicas x max_ongoing_requests."))
    turn_retry_after_s: int = Field(1, ge=1, description="Retry-After, in seconds, of a 429 for a talk turn.")
    live: LiveConfig = Field(LiveConfig(), description="Live sessions over a WebSocket.")
    admission: AdmissionConfig = Field(AdmissionConfig(), description=(
        "Caps on event streams, uploads in progress and talk turns, in total and per client."))
    body_timeout_s: float = Field(30.0, gt=0, description=(
        "Seconds within which a request body (an upload) must arrive, or the request gets 408: a "
        "client that trickles its body cannot hold the ingress."))
    storage_dir: str | None = Field(None, description=(
        "Folder of job records and finished MP4s (written atomically, so a restarted ingress still "
        "has them); prepared avatars and the compile cache go under it by default. None: "
        "`$AVATAR_SERVE_STORAGE/<profile>` (default ~/.cache/avatar-serve/<profile>), filled in when "
        "the profile is loaded."))
    result_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description=(
        "Finished results are deleted after this age, in seconds."))
    max_result_bytes: int = Field(20 * 1024**3, gt=0, description=(
        "Finished results beyond this total size, in bytes, are deleted oldest first."))
    api_keys: list[str] = Field(default_factory=list, description=(
        "Bearer-token API keys; when any key is configured, every route but /healthz and /readyz needs "
        "one. Keys from every source apply together: this list, the environment variable named by "
        "`api_keys_env` and the file `api_keys_file`, all read once where the application is built "
        "(`serve run graph:app` builds it in your shell; `serve run serve_config.yaml`, `serve deploy` "
        "and a `ray start` cluster build it in a Ray worker, which has the environment of `ray start` "
        "plus the application's runtime_env, not the environment of the `serve` command). The keys "
        "then travel to the ingress inside this config, wherever its replica runs."))
    api_keys_env: str | None = Field("AVATAR_SERVE_API_KEYS", description=(
        "An environment variable of comma-separated API keys (see api_keys). Set but holding no key "
        "(e.g. ','): start-up stops."))
    api_keys_file: str | None = Field(None, description=(
        "A file of API keys, one a line (lines starting with '#' are comments). Set but missing, unreadable or "
        "without a key: start-up stops; it never runs open instead."))
    require_api_keys: bool = Field(False, description=(
        "Start only with at least one API key found; otherwise start-up stops with an "
        "error naming where it looked. serve_config.yaml sets it, so a key given where the "
        "application cannot see it never leaves the server open."))
    admin_keys: list[str] = Field(default_factory=list, description=(
        "Keys for the admin routes (/v1/admin/...), which API keys do not grant; from the same "
        "kinds of sources as api_keys. With no key of either kind configured, the admin routes are "
        "open like the rest (a development setup)."))
    admin_keys_env: str | None = Field("AVATAR_SERVE_ADMIN_KEYS", description="like api_keys_env, for admin keys")
    admin_keys_file: str | None = Field(None, description="like api_keys_file, for admin keys")
    webhooks: WebhookConfig = Field(WebhookConfig(), description=(
        "Completion webhooks (a job's callback_url): the signing secret, allowed destinations, retries."))
    lora_dirs: list[str] = Field(default_factory=list, description=(
        "Folders the admin LoRA routes may load files from (symlinks are resolved first); a relative "
        "path is taken inside the first. Empty: loading LoRAs through the admin routes is off. "
        "Per-request LoRAs (a request's `loras`) are the `.safetensors` files directly in these "
        "folders, named by file name without the suffix."))
    max_request_loras: int = Field(4, ge=0, le=16, description=(
        "The most LoRAs one request may name in `loras` (0: per-request LoRAs off)."))

    @model_validator(mode="after")
    def _keys_usable(self) -> ServingConfig:
        for key in (*self.api_keys, *self.admin_keys):
            if not KEY_CHARS.fullmatch(key):
                raise ValueError("an API or admin key must be visible ASCII characters without spaces or "
                                 "commas (it travels in an Authorization header)")
        if self.require_api_keys and not self.api_keys:
            raise ValueError(
                "serving.require_api_keys is set but no API key was found where the application was "
                f"built: none in serving.api_keys, in the environment variable {self.api_keys_env}, or "
                "in serving.api_keys_file. On a `ray start` cluster the application is built by a Ray "
                "worker with the environment of `ray start`, not of `serve run` / `serve deploy`: give "
                "the keys in serve_config.yaml (runtime_env: {env_vars: {AVATAR_SERVE_API_KEYS: ...}}), "
                "in serving.api_keys_file, or set the variable when starting Ray")
        return self
