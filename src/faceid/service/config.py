"""What a server is told at start: where its data lives, who may use it, its limits and its models."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FaceIDError
from ..images import DEFAULT_MAX_PIXELS
from ..settings import GenerationSettings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # a server bound there answers only this machine

# A style adapter's name: what requests give, and the branch name of the attention processors (no dots there).
STYLE_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class ServeConfig:
    """Everything ``create_app`` needs. Models come as ``pipeline`` (a ready ``FaceIDPipeline`` of the default
    model set) or ``loader`` (called in the worker thread with the device name and a model set's model fields);
    the face analyzer as ``analyzer`` or, by default, the pipeline's.

    ``catalog``: the model sets this server may load, each as its model fields (``base_model``, ``adapter``,
    ``vae``, ``loras``); the first is the default, loaded by every worker at start (or given as ``pipeline``).
    Empty: one, the loader's defaults. More than one need a ``loader``; each worker then keeps the ones it used
    last within ``model_memory_gb`` (default: a fraction of its device's memory, or of the RAM on CPU)."""

    data_dir: Path = Path("faceid-data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/faceid.db
    api_keys: tuple[str, ...] = ()
    max_queue: int = 16  # queued jobs (running ones not counted); more -> 429
    max_batch: int = 4  # images per pipeline call when compatible jobs are batched
    max_upload_bytes: int = 20 * 1024 * 1024  # per photo
    max_photos: int = 10  # per identity
    max_pixels: int = DEFAULT_MAX_PIXELS  # per photo, checked from the header before decoding
    max_images: int = 8  # per generation request (prompts x images per prompt)
    max_steps: int = 100
    max_side: int = 2048  # width and height
    # Seconds a request that answers with its images (the OpenAI and A1111 protocols) waits for its job; then the
    # job is cancelled and the answer is 504.
    sync_timeout: float = 600.0
    small_face: int = 64  # px; a narrower face is enrolled with a warning
    # Quotas per owner (an API key; without keys the one local owner), None: no quota. Counts beyond them -> 429,
    # stored bytes (identities' photos, crops and embeddings, uploads, generated images) -> 413 (``policy.Policy``).
    max_identities: int | None = 1000
    max_uploads: int | None = 1000
    max_stored_bytes: int | None = 10 * 1024**3
    max_queued_per_key: int | None = None  # generations waiting per key (None: up to max_queue)
    # The Host header values the server answers (``policy.HostRules``): NAME (any port), NAME:PORT, *.DOMAIN, * (any).
    # None: the loopback names (127.0.0.1, localhost, ::1) on the port it listens on; ``faceid serve`` gives the
    # names of its --host and --port plus --allowed-host (``policy.bound_hosts``).
    allowed_hosts: tuple[str, ...] | None = None
    # A ``preview`` event every this many steps and at the last one (None: none); decoded by the tiny VAE when the
    # pipeline has one (``faceid serve --tiny-vae``: milliseconds), else by the VAE (about a step's time each).
    preview_every: int | None = None
    devices: tuple[str, ...] = ("default",)  # one generation worker each
    pipeline: Any = None
    loader: Callable[[str, GenerationSettings], Any] | None = None
    catalog: tuple[GenerationSettings | Mapping[str, Any], ...] = ()
    model_memory_gb: float | None = None  # per worker
    # The ControlNets of each control kind (canny, kps, pose, depth, image), one per base model family: kind -> a Hub
    # id or folder (its family read from its config.json at start), several of them (of different families), or
    # {family: source} (read already, as ``faceid serve`` gives it). Normalised to {kind: {family: source}}
    # (``check_controlnets``). Each worker loads onto every model set it loads the ones of the set's family (with the
    # kind's annotator: OpenPose for pose, the depth model for depth). The allowlist: a request names a kind, never
    # a model.
    controlnets: Mapping[str, Any] = field(default_factory=dict)
    # The style adapters a request may name, name -> source: "plain", "plus" or "plus-face" (h94/IP-Adapter's, for
    # the model set's family) or a checkpoint file; each worker loads them onto every model set it loads
    # (``FaceIDPipeline.load_reference``). The allowlist: a request names an adapter, never a file.
    style_adapters: Mapping[str, str] = field(default_factory=dict)
    # The few-step presets requests may name (``fast``), preset -> a local copy of its LoRA (None: the pinned Hub
    # file): each worker loads them onto every model set it loads (``ModelSet.load_fast_lora``), at start for the
    # default one; a preset not given here is refused at submit (``capabilities.Capabilities.check``).
    fast: Mapping[str, str | None] = field(default_factory=dict)
    # Identity methods beside FaceID a request may ask for (``method``), name -> the folder of its released files
    # (``faceid serve --method-weights NAME=FOLDER``, as generate's): each worker loads the method onto every model
    # set of a family it runs on (``ModelSet.load_method``), counted in its memory budget; the face analysis gets
    # the method's insightface pack (antelopev2 for InstantID) from ``face_models`` or the cache, so that enrolled
    # identities keep that pack's embedding too. A method not given here is refused at submit.
    methods: Mapping[str, str | None] = field(default_factory=dict)  # None: the method's pinned files, fetched
    face_models: str | None = None  # the folder of the face models (--face-models); None: faceid's cache
    # The CLIP image encoder that reads style images where the model set has none (a FaceID-Plus adapter brings
    # its own); None: h94/IP-Adapter's ViT-H, fetched on first use.
    reference_encoder: str | None = None
    analyzer: Any = None
    # Speech to text for spoken prompts (POST /openai/v1/audio/transcriptions, the web app's microphone): a Hub id or
    # folder of a Whisper model, "default" for faceid.speech's pinned one, loaded at start; or ``transcriber``, a
    # ready ``faceid.speech.Transcriber``. Neither: the server has no speech capability (requests for it get 400).
    speech_model: str | None = None
    transcriber: Any = None
    models: dict[str, Any] = field(default_factory=dict)  # what was configured, for GET /v1/models
    start_workers: bool = True  # False: jobs wait in the queue (tests of restarts)
    # service -> its workers, instead of one ``Worker`` per device (Ray Serve: workers that hand jobs to replicas)
    worker_factory: Callable[[Any], list] | None = None
    # A process whose workers run jobs writes a heartbeat to the database every lease/5 seconds; a running job whose
    # process has none for ``lease_seconds`` (or whose process on this host has exited) is queued again by any other.
    lease_seconds: float = 30.0
    image_extra: dict[str, Any] = field(default_factory=dict)  # more metadata in every PNG (Ray: the replica)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().absolute()
        for name in ("max_queue", "max_batch", "max_upload_bytes", "max_photos", "max_pixels", "max_images",
                     "max_steps", "max_side"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise FaceIDError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.sync_timeout > 0:
            raise FaceIDError(f"sync_timeout must be more than 0 seconds, got {self.sync_timeout}")
        for name in ("max_identities", "max_uploads", "max_stored_bytes", "max_queued_per_key"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise FaceIDError(f"{name} must be at least 1 (None: no quota), got {getattr(self, name)}")
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(self.allowed_hosts)
        from .store import check_database_url

        self.database_url = check_database_url(self.database_url)
        if self.preview_every is not None and int(self.preview_every) < 1:
            raise FaceIDError(f"preview_every must be at least 1 step (None: no previews), got {self.preview_every}")
        if self.pipeline is None and self.loader is None:
            raise FaceIDError("give the server a pipeline or a loader of one")
        self.catalog = tuple(GenerationSettings.parse(spec) for spec in self.catalog)
        if len(self.catalog) > 1 and self.loader is None:
            raise FaceIDError("several model sets need a loader: a ready pipeline is one model set")
        if self.model_memory_gb is not None and not self.model_memory_gb > 0:
            raise FaceIDError(f"model_memory_gb must be more than 0, got {self.model_memory_gb}")
        self.controlnets = check_controlnets(self.controlnets)
        self.style_adapters = dict(self.style_adapters)
        for name, source in self.style_adapters.items():
            if not STYLE_ADAPTER_NAME.fullmatch(str(name)):
                raise FaceIDError(
                    f"style_adapters: {name!r} is not a name a request can give: use letters, digits, '-' and '_' "
                    "(up to 64)"
                )
            if not isinstance(source, str) or not source.strip():
                raise FaceIDError(
                    f"style_adapters: give the source of {name!r}: plain, plus, plus-face or a checkpoint file"
                )
        from .capabilities import check_fast_presets, check_methods

        self.fast = check_fast_presets(self.fast)
        self.methods = check_methods(self.methods)
        self.api_keys = tuple(self.api_keys)
        if any(not key or any(c.isspace() for c in key) for key in self.api_keys):
            raise FaceIDError("API keys must be non-empty and without spaces")

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'faceid.db'}"

    def owner_of(self, key: str | None) -> str | None:
        """The owner id of an API key (a hash: keys themselves are never stored); None when it is not one of
        ours. Without keys every request is the local owner ``""``."""
        if not self.api_keys:
            return ""
        if key is None:
            return None
        for known in self.api_keys:
            if hmac.compare_digest(known.encode(), key.encode()):
                return owner_id(known)
        return None


def check_controlnets(given: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``ServeConfig.controlnets`` -> {kind: {family: source}}. A kind's value: a source (a Hub id or folder), a list
    of sources, or {family: source}; the family of a source given alone is read from its config.json
    (``faceid.modes.controlnet_family``: a source that does not read stops the start, naming it). Two ControlNets of
    one kind and family are an error: a request names a kind, and the model set's family picks the net."""
    from ..control import KINDS
    from ..families import FAMILIES
    from ..modes import controlnet_family

    found: dict[str, dict[str, str]] = {}
    for kind, value in dict(given).items():
        if kind not in KINDS:
            raise FaceIDError(f"controlnets: unknown control kind {kind!r}; the kinds are {', '.join(KINDS)}")
        if isinstance(value, Mapping):
            pairs = list(value.items())
            for family, _ in pairs:
                if family not in FAMILIES:
                    raise FaceIDError(
                        f"controlnets: {kind!r} names family {family!r}; the families are {', '.join(FAMILIES)}"
                    )
        else:
            sources = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            for source in sources:
                if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
                    raise FaceIDError(f"controlnets: give the ControlNet of {kind!r} as a Hub id or a folder")
            pairs = [(controlnet_family(source), source) for source in dict.fromkeys(str(s) for s in sources)]
        mine: dict[str, str] = {}
        for family, source in pairs:
            if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
                raise FaceIDError(f"controlnets: give the ControlNet of {kind!r} as a Hub id or a folder")
            if family in mine and mine[family] != str(source):
                raise FaceIDError(
                    f"--controlnet {kind}= is given twice for {family} ({mine[family]}, {source}): give one per kind "
                    "and family (a second one of another family is fine: each model set runs its own family's)"
                )
            mine[family] = str(source)
        found[kind] = mine
    return found


def owner_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def read_api_keys(keys: Iterable[str] = (), keys_file: str | os.PathLike | None = None) -> tuple[str, ...]:
    """``--api-key`` values plus the lines of ``--api-keys-file`` (blank lines and ``#`` comments skipped)."""
    found = [k.strip() for k in keys]
    if keys_file is not None:
        path = Path(keys_file)
        if not path.is_file():
            raise FaceIDError(f"API keys file not found: {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    if keys_file is not None and not found:
        raise FaceIDError(f"{keys_file} holds no API key (one key per line)")
    return tuple(dict.fromkeys(found))


def check_bind(host: str, api_keys: tuple[str, ...], insecure_no_auth: bool) -> None:
    """Without keys the server answers anyone who reaches it: only on the loopback interface, unless asked."""
    if api_keys or host in LOOPBACK_HOSTS or insecure_no_auth:
        return
    raise FaceIDError(
        f"refusing to serve on {host} without authentication: give --api-key KEY (or --api-keys-file FILE), "
        "or --insecure-no-auth if every machine that can reach it may use it (and read its identities)"
    )
