"""``faceid serve``: the HTTP API (enroll people from photos, queue generations of them), on uvicorn or on Ray
Serve."""

from __future__ import annotations

import argparse
import logging

from ..control import KINDS as CONTROL_KINDS
from ..errors import FaceIDError
from ..fast import PRESETS as FAST_PRESETS
from .flags import add_settings_arguments, int_at_least, settings_from_args
from .loading import DTYPES, add_model_loading_arguments, load_face_analyzer, method_weights
from .logs import quiet_model_loading

logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``faceid serve``: where, who, limits; the model flags of ``generate`` (from ``GenerationSettings``)."""
    from ..settings import MODEL_FIELDS, GenerationSettings

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="default 7860")
    parser.add_argument("--data-dir", default="faceid-data", help="photos, crops, embeddings, images, database")
    parser.add_argument(
        "--database-url",
        default=None,
        help="postgresql://USER@HOST/DATABASE (several processes or machines) or any SQLAlchemy URL (default: "
        "sqlite:///DATA_DIR/faceid.db); the schema is created and upgraded at start",
    )
    add_settings_arguments(parser, exclude=tuple(f for f in GenerationSettings.model_fields if f not in MODEL_FIELDS))
    add_model_loading_arguments(parser, several_devices=True, fast_lora=False)
    parser.add_argument(
        "--also-model",
        action="append",
        type=_model_set,
        default=[],
        metavar="BASE_MODEL[,ADAPTER[,VAE]]",
        help="another model set a request may pick by naming its models (repeatable; an empty BASE_MODEL: the "
        "adapter's released base model); the model flags above are the default set",
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        type=_controlnet_of_kind,
        default=[],
        metavar="KIND=SOURCE",
        help=f"the ControlNet (Hub id or diffusers folder) that requests' control images of KIND "
        f"({'|'.join(CONTROL_KINDS)}) go to; repeatable, one per kind and base model family: its family (SD1.5, SDXL, "
        "FLUX.1) is read from its config.json, and each model set loads the ones of its family (a FLUX.1 set its "
        "FluxControlNetModels). A request names a kind, never a model; a kind the request's model set has none for "
        "is refused. Loaded by every worker with each model set of its family (with OpenPose for pose, the depth "
        "model for depth): a missing one is an error at start",
    )
    parser.add_argument(
        "--style-adapter",
        action="append",
        type=_style_adapter,
        default=[],
        metavar="NAME=SOURCE",
        help="a style adapter requests may name in style=[{adapter: NAME, ...}]: SOURCE is plain, plus or plus-face "
        "(h94/IP-Adapter's, for the model set's family) or an IP-Adapter checkpoint file; repeatable. A request names "
        "an adapter, never a file. Loaded by every worker with each model set: a missing one is an error at start",
    )
    parser.add_argument(
        "--fast",
        dest="fast_presets",  # not ``fast``: that is a GenerationSettings field (settings_from_args reads it)
        action="append",
        type=_fast_preset,
        default=[],
        metavar="PRESET[=FILE]",
        help=f"a few-step preset requests may ask for with fast=PRESET ({'|'.join(FAST_PRESETS)}); FILE: a local copy "
        "of its LoRA (as generate's --fast-lora), else the pinned Hub file, fetched at start. Repeatable. Loaded by "
        "every worker with each model set; presets not given here are refused (422)",
    )
    parser.add_argument(
        "--method-weights",
        action="append",
        default=None,
        metavar="NAME[=FOLDER]",
        help="an identity method requests may ask for with method=NAME, its released files in FOLDER in their Hub "
        "layout (instantid: InstantX/InstantID's ip-adapter.bin and ControlNetModel/; pulid: pulid_v1.1.safetensors, "
        "EVA02_CLIP_L_336_psz14_s6B.pt and parsing_bisenet.pth; infiniteyou: infu_flux_v1.0/ with facexlib's "
        "recognition_arcface_ir_se50.pth; pulid-flux: pulid_flux_v0.9.1.safetensors and pulid's other two), as "
        "generate's; NAME alone: its released files fetched at their pinned commits, sha256-checked (instantid, "
        "pulid, pulid-flux); repeatable. Loaded by every worker onto each model set of a family the method runs on (a FLUX.1 "
        "model set's first one is its default method); the face analysis also embeds with the method's recognizer "
        "(antelopev2; InfiniteYou's IR-SE50), so identities enrolled from then on can use it",
    )
    parser.add_argument(
        "--reference-encoder",
        default=None,
        metavar="PATH",
        help="the CLIP image encoder (folder or Hub id) that reads style images where the model set has none "
        "(default: h94/IP-Adapter's ViT-H; a FaceID-Plus adapter's own encoder is used when it has one)",
    )
    parser.add_argument(
        "--preview-every",
        type=int_at_least(0),
        default=None,
        metavar="K",
        help="stream a preview of each image every K steps and at the last one (the events' 'preview'; 0: none). "
        f"Default: every {SERVE_PREVIEW_EVERY} steps with --tiny-vae (a tiny decode costs milliseconds), none "
        "without (each preview would be a full VAE decode)",
    )
    parser.add_argument(
        "--model-memory-gb",
        type=float,
        default=None,
        help="per worker: loaded model sets beyond this evict the least recently used (default: 3/4 of a CUDA "
        "device's memory, half the RAM on CPU)",
    )
    parser.add_argument(
        "--speech-model",
        nargs="?",
        const="default",
        default=None,
        metavar="SOURCE",
        help="transcribe spoken prompts (the web app's microphone, POST /openai/v1/audio/transcriptions) with this "
        "speech model: a Hub id or folder of a Whisper model; without SOURCE, openai/whisper-small at a pinned commit. "
        "Loaded at start",
    )
    parser.add_argument(
        "--sync-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long a request that answers with its images (the OpenAI Images API at /openai/v1) waits for them; "
        "then its job is cancelled and the answer is 504 (default 600)",
    )
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY", help="require this key (repeatable)")
    parser.add_argument("--api-keys-file", default=None, metavar="FILE", help="API keys, one per line")
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve on a non-loopback --host without API keys (anyone who reaches it can use it)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        type=_allowed_host,
        default=[],
        metavar="NAME[:PORT]",
        help="another name this server is reached by (a LAN name, a reverse proxy's; repeatable; *.DOMAIN: its "
        "subdomains): requests whose Host header is not one of its names get 403 forbidden_host (DNS rebinding), "
        "and without keys a POST/PUT/PATCH/DELETE from a page of another origin gets 403 forbidden_origin. Its names "
        "by default: 127.0.0.1, localhost and [::1] with --port on a loopback --host, any on 0.0.0.0 or :: (then "
        "--allowed-host limits them to the loopback names and these)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="serve on Ray Serve: the API as ingress, one model replica per GPU (CPU replicas without GPUs); "
        "ADDRESS of a running cluster (ray://... or auto), else a local Ray instance",
    )
    parser.add_argument(
        "--replicas",
        type=int_at_least(1),
        default=None,
        help="--ray: model replicas, each a worker claiming jobs from the shared queue (default: the cluster's GPUs, "
        "or 1)",
    )
    parser.add_argument(
        "--ingress-replicas",
        type=int_at_least(1),
        default=1,
        help="--ray: replicas of the HTTP API; any of them answers for any job (the state is in the database)",
    )
    for flag, default, text in (
        ("--max-queue", 16, "queued generations before new ones get 429"),
        ("--max-batch", 4, "images per pipeline call when compatible jobs run together"),
        ("--max-images", 8, "images per generation request"),
        ("--max-steps", 100, "denoising steps per request (left out: the model's, at most this)"),
        ("--max-side", 2048, "image width and height (left out: the model's, within this)"),
        ("--max-upload-mb", 20, "size of one uploaded photo"),
    ):
        parser.add_argument(flag, type=int_at_least(1), default=default, help=f"{text} (default {default})")
    for flag, default, text in (  # quotas per API key (without keys: of the one local owner); 0: none
        ("--max-identities", 1000, "identities one key keeps (more: 429 quota_exceeded)"),
        ("--max-uploads", 1000, "uploads one key keeps (more: 429 quota_exceeded)"),
        ("--max-stored-mb", 10240, "MB one key stores: identities' photos, crops and embeddings, uploads, generated "
                                   "images (more: 413 quota_exceeded)"),
        ("--max-queued-per-key", 0, "generations of one key waiting in the queue (more: 429 quota_exceeded; 0: up to "
                                    "--max-queue)"),
    ):  # fmt: skip
        parser.add_argument(
            flag, type=int_at_least(0), default=default, help=f"{text}; 0: no quota (default {default})"
        )


# ``faceid serve --tiny-vae``'s previews: a few per generation at the usual 20-50 steps, for a few milliseconds each
SERVE_PREVIEW_EVERY = 5


def serve_preview_every(given: int | None, tiny_vae: str | None) -> int | None:
    """``--preview-every``'s value for ``ServeConfig.preview_every``: as given (0: None), else the default."""
    if given is None:
        return SERVE_PREVIEW_EVERY if tiny_vae is not None else None
    return given or None


def _allowed_host(text: str) -> str:
    """``--allowed-host NAME[:PORT]`` (also ``[IPV6]:PORT``, ``*.DOMAIN``), checked as ``ServeConfig`` reads it."""
    from ..service.policy import parse_host

    try:
        parse_host(text)
    except FaceIDError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: give NAME, NAME:PORT or *.DOMAIN") from None
    return text.strip()


def policy_options(args: argparse.Namespace) -> dict:
    """``ServeConfig``'s quota and host fields from ``faceid serve``'s flags (0: no quota)."""
    from ..service.policy import bound_hosts

    return {
        "max_identities": args.max_identities or None,
        "max_uploads": args.max_uploads or None,
        "max_stored_bytes": args.max_stored_mb * 1024 * 1024 or None,
        "max_queued_per_key": args.max_queued_per_key or None,
        "allowed_hosts": bound_hosts(args.host, args.port, args.allowed_host),
    }


def _warn_any_host(args: argparse.Namespace) -> None:
    from ..service.policy import WILDCARD_BINDS

    if args.host in WILDCARD_BINDS and not args.allowed_host:
        logger.warning(
            "serving on %s answers requests for any host name: give --allowed-host NAME (repeatable) with the names "
            "clients use to refuse the others (a page that rebinds its own name to this address)",
            args.host or "*",
        )


def _model_set(text: str) -> dict:
    """``--also-model BASE_MODEL[,ADAPTER[,VAE]]`` -> the model fields of one catalog entry."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 3 or not any(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give BASE_MODEL[,ADAPTER[,VAE]]")
    return {key: value for key, value in zip(("base_model", "adapter", "vae"), parts, strict=False) if value}


def _controlnet_of_kind(text: str) -> tuple[str, str]:
    """``--controlnet KIND=SOURCE`` of ``faceid serve`` -> (kind, source)."""
    kind, sep, source = text.partition("=")
    if not sep or kind not in CONTROL_KINDS or not source.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give KIND=SOURCE with KIND one of {', '.join(CONTROL_KINDS)}")
    return kind, source.strip()


def _fast_preset(text: str) -> tuple[str, str | None]:
    """``--fast PRESET[=FILE]`` of ``faceid serve`` -> (preset, file or None)."""
    name, sep, source = text.partition("=")
    if name not in FAST_PRESETS or (sep and not source.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give PRESET or PRESET=FILE with PRESET one of {', '.join(FAST_PRESETS)}"
        )
    return name, source.strip() or None


def _style_adapter(text: str) -> tuple[str, str]:
    """``--style-adapter NAME=SOURCE`` of ``faceid serve`` -> (name, source)."""
    from ..service.config import STYLE_ADAPTER_NAME

    name, sep, source = text.partition("=")
    if not sep or not STYLE_ADAPTER_NAME.fullmatch(name) or not source.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=SOURCE with NAME of letters, digits, '-' and '_' and SOURCE plain, plus, plus-face "
            "or a checkpoint file"
        )
    return name, source.strip()


def cmd_serve(args: argparse.Namespace) -> int:
    from ..service.config import ServeConfig
    from ..service.core import analyzer_for_methods

    loader, fields = serve_parts(args)
    import uvicorn

    from ..service import create_app
    from ..settings import GenerationSettings

    methods = fields["methods"]
    if args.ray is not None:
        return _serve_on_ray(args, loader, fields)
    # one, shared by every model set, with the packs of the methods (a missing pack: said before models load)
    analyzer = analyzer_for_methods(load_face_analyzer(args.face_models), methods, args.face_models)

    def load(device: str, models):
        quiet_model_loading()
        return loader(device, models, analyzer)

    devices = tuple(args.device or ["default"])
    # One device: load here, so that a model that cannot load is one error line before the server starts.
    pipeline = load(devices[0], GenerationSettings.parse(fields["catalog"][0])) if len(devices) == 1 else None
    fields["models"]["devices"] = list(devices)
    config = ServeConfig(**fields, devices=devices, pipeline=pipeline, loader=load, analyzer=analyzer)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")
    return 0


def serve_parts(args: argparse.Namespace):
    """What ``faceid serve`` (on uvicorn or on Ray) is made of, checked before anything loads or is written: the
    model loader (``PipelineLoader``) and ``ServeConfig``'s picklable fields."""
    from ..service.capabilities import check_fast_presets, check_methods
    from ..service.config import check_bind, read_api_keys
    from ..service.models import PipelineLoader
    from ..service.store import check_database_url
    from ..settings import MODEL_FIELDS

    keys = read_api_keys(args.api_key or (), args.api_keys_file)
    check_bind(args.host, keys, args.insecure_no_auth)  # before anything loads or is written
    args.database_url = check_database_url(args.database_url)  # a bad URL or a missing driver: said at once
    _warn_any_host(args)
    settings = settings_from_args(args)
    controlnets = _controlnets(args.controlnet)  # before anything loads
    style_adapters = _named_once(args.style_adapter, "--style-adapter", "name")
    fast = check_fast_presets(_fast_once(args.fast_presets))  # a missing FILE: said before anything loads
    methods = check_methods(method_weights(args, "faceid"))  # a missing folder: said before anything loads
    default = settings.model_dump(include=set(MODEL_FIELDS), exclude_none=True)
    check_flux_options(args, [default, *args.also_model], methods)  # before anything loads
    loader = PipelineLoader(
        vae_tiny=settings.tiny_vae,
        base_config=args.base_config,
        image_encoder=args.image_encoder,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        compile=args.compile,
        face_models=args.face_models,
        methods=tuple(methods.items()),
        offload=args.offload,
        quantize=args.quantize,
    )
    return loader, serve_config_fields(args, keys, settings, controlnets, style_adapters, fast, methods)


def serve_config_fields(args, keys, settings, controlnets, style_adapters, fast, methods) -> dict:
    """``ServeConfig``'s fields from ``faceid serve``'s flags, but the models, devices and face analyzer (each
    process loads its own): picklable, the same for a single server and for every Ray replica."""
    from ..settings import MODEL_FIELDS

    preview_every = serve_preview_every(args.preview_every, settings.tiny_vae)
    default = settings.model_dump(include=set(MODEL_FIELDS), exclude_none=True)
    return dict(
        data_dir=args.data_dir,
        database_url=args.database_url,
        api_keys=keys,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_side=args.max_side,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024,
        sync_timeout=args.sync_timeout,
        speech_model=args.speech_model,
        catalog=(default, *args.also_model),
        model_memory_gb=args.model_memory_gb,
        preview_every=preview_every,
        controlnets=controlnets,
        style_adapters=style_adapters,
        fast=fast,
        methods=methods,
        face_models=args.face_models,
        reference_encoder=args.reference_encoder,
        **policy_options(args),
        models={
            **settings.to_json(),
            "face_models": args.face_models,
            "dtype": args.dtype,
            "preview_every": preview_every,
            "controlnets": controlnets,
            "style_adapters": style_adapters,
            "fast": fast,
            "methods": methods,
            "reference_encoder": args.reference_encoder,
            "offload": args.offload,
            "quantize": args.quantize,
        },  # fmt: skip
    )


def check_flux_options(args: argparse.Namespace, model_sets: list[dict], methods: dict[str, str]) -> None:
    """What a FLUX.1 model set of ``faceid serve`` needs, said before anything loads: a method of its family among
    ``--method-weights`` (it has no FaceID adapter), no ``--tiny-vae`` (none for FLUX.1 yet); and ``--offload`` /
    ``--quantize`` only where a model set is FLUX.1 (the Stable Diffusion ones run whole on their device)."""
    from ..methods import METHODS
    from ..model_set import family_without_adapter
    from ..service.models import methods_for

    families = [family_without_adapter(spec.get("base_model"), spec.get("adapter")) for spec in model_sets]
    for spec, family in zip(model_sets, families, strict=True):
        if family is None:
            continue
        if not methods_for(family, methods):
            runs = [m.name for m in METHODS.values() if family in m.families and m.wired]
            raise FaceIDError(
                f"{spec['base_model']} is a {family} model set, without a FaceID adapter: it generates with an "
                f"identity method of its family ({', '.join(runs)}); give --method-weights NAME=FOLDER for one"
            )
        if getattr(args, "tiny_vae", None) is not None:
            raise FaceIDError(f"--tiny-vae: there is no tiny VAE for {family} model sets yet; leave it out")
    if (args.offload or args.quantize) and all(family is None for family in families):
        raise FaceIDError(
            "--offload and --quantize are the memory options of FLUX.1 model sets, and this server serves none "
            "(the Stable Diffusion model sets run whole on their device): leave them out"
        )


def _controlnets(given: list[tuple[str, str]]) -> dict[str, dict[str, str]]:
    """``--controlnet KIND=SOURCE`` flags -> {kind: {family: source}}, each source's family read from its config
    (``ServeConfig.controlnets``); a kind given twice for one family is an error."""
    from ..service.config import check_controlnets

    sources: dict[str, list[str]] = {}
    for kind, source in given:
        sources.setdefault(kind, []).append(source)
    return check_controlnets(sources)


def _fast_once(given: list[tuple[str, str | None]]) -> dict[str, str | None]:
    """``--fast PRESET[=FILE]`` flags -> {preset: file or None}; a preset given twice with different files is an
    error."""
    found: dict[str, str | None] = {}
    for name, source in given:
        if name in found and found[name] != source:
            raise FaceIDError(f"--fast {name} is given twice ({found[name]}, {source}): give one file per preset")
        found[name] = source
    return found


def _named_once(given: list[tuple[str, str]], flag: str, key_is: str) -> dict[str, str]:
    """``flag KEY=SOURCE`` flags -> {key: source}; a key given twice with different sources is an error."""
    found: dict[str, str] = {}
    for key, source in given:
        if key in found and found[key] != source:
            raise FaceIDError(f"{flag} {key}= is given twice ({found[key]}, {source}): give one per {key_is}")
        found[key] = source
    return found


def _serve_on_ray(args: argparse.Namespace, loader, fields: dict) -> int:
    """``faceid serve --ray``: the same service on Ray Serve (``faceid.service.ray_serve``)."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise FaceIDError("--ray needs Ray Serve: pip install 'faceid[cluster]'") from exc
    from ..service.ray_serve import APP_NAME, build_application, warn_cluster_database

    if args.device:
        raise FaceIDError("--ray places the models itself (one replica per GPU): leave out --device")
    warn_cluster_database(fields["database_url"], args.ray)
    ray.init(address=args.ray or None)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    options = ray_options(args, fields, gpus)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(loader, options), name=APP_NAME, route_prefix="/", blocking=True)
    return 0


def ray_options(args: argparse.Namespace, fields: dict, gpus: int):
    """How ``faceid serve --ray`` lays out its application (``gpus``: the cluster's): ``--replicas`` model replicas
    (default: one per GPU, or one), ``--ingress-replicas`` ingress ones, every replica with the server's fields."""
    from ..service.ray_serve import RayOptions

    if args.device:
        raise FaceIDError("--ray places the models itself (one replica per GPU): leave out --device")
    replicas = args.replicas or max(1, gpus)
    fields = {**fields, "models": {**fields["models"], "ray": args.ray or "local", "replicas": replicas}}
    return RayOptions(replicas=replicas, ingress_replicas=args.ingress_replicas, gpus=gpus > 0, config=fields)
