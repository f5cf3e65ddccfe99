"""Several model sets per server: the catalog of what it may load, and each worker's loaded pipelines.

The catalog is an allowlist: every entry comes from the server's configuration (``faceid serve``'s model flags
for the first, ``--also-model`` for the others). A request only picks one by the model fields it names
(``faceid.settings.MODEL_FIELDS``); its values are compared as text with each entry's names and never reach a
filesystem path or the Hub. Each worker keeps the pipelines it loaded, least recently used first, within a
memory budget (``LoadedModels``).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import FaceIDError
from ..settings import MODEL_FIELDS, GenerationSettings

logger = logging.getLogger(__name__)

GB = 1024**3
DEVICE_MEMORY_FRACTION = 0.75  # of a CUDA device's memory, by default: room for activations and a load in flight
HOST_MEMORY_FRACTION = 0.5  # of the system RAM on CPU (and MPS, whose memory is the system's)


class ModelNotServed(FaceIDError):
    """A request names models that are not in this server's catalog."""


@dataclass(frozen=True, eq=False)
class ModelEntry:
    """One model set this server may load: its model fields as ``FaceIDPipeline.from_pretrained`` loads them
    (base model and VAE filled in for a released adapter) and its family."""

    index: int
    models: GenerationSettings  # only the MODEL_FIELDS are set
    family: str

    @classmethod
    def configured(cls, index: int, spec: GenerationSettings | Mapping[str, Any]) -> ModelEntry:
        """An entry from configuration, described without loading its weights."""
        from ..model_set import family_without_adapter
        from ..pipeline import default_models, model_family
        from ..variants import DEFAULT_ADAPTER

        spec = GenerationSettings.parse(spec)
        others = sorted(k for k in spec.model_fields_set if k not in MODEL_FIELDS)
        if others:
            raise FaceIDError(f"a model set names models only ({', '.join(MODEL_FIELDS)}), not {', '.join(others)}")
        family = family_without_adapter(spec.base_model, spec.adapter)
        if family is not None:  # FLUX.1: no FaceID adapter, its identity methods from the server's --method-weights
            if spec.loras:
                raise FaceIDError(f"a {family} model set takes no LoRAs yet: leave them out of {spec.base_model}")
            return cls(index, GenerationSettings(base_model=str(spec.base_model), vae=spec.vae), family)
        adapter = spec.adapter or DEFAULT_ADAPTER
        base_model, vae = default_models(spec.base_model, adapter, spec.vae)
        models = GenerationSettings(base_model=base_model, adapter=adapter, vae=vae, loras=spec.loras or None)
        return cls(index, models, model_family(base_model, adapter))

    @classmethod
    def of(cls, index: int, family: str, defaults: GenerationSettings) -> ModelEntry:
        """The entry of a loaded pipeline, from its family and its resolved defaults."""
        values = defaults.model_dump(include=set(MODEL_FIELDS))
        return cls(index, GenerationSettings(**{**values, "loras": values["loras"] or None}), family)

    def matches(self, requested: GenerationSettings) -> bool:
        """Whether every model field ``requested`` names is this entry's, as configured or as its resolved path
        (``model_set._source_key``, applied to the configured side only: the request's text is never a path)."""
        for key in ("base_model", "adapter", "vae"):
            wanted = getattr(requested, key)
            if wanted is not None and wanted not in _names(getattr(self.models, key)):
                return False
        if requested.loras is None:
            return True
        have = self.models.loras or {}
        if len(requested.loras) != len(have):
            return False
        return all(
            any(source in _names(mine) and float(weight) == float(w) for mine, w in have.items())
            for source, weight in requested.loras.items()
        )

    def label(self) -> str:
        # its models only (the settings object's other fields are at their defaults, not the entry's)
        named = self.models.model_dump(mode="json", include=set(MODEL_FIELDS), exclude_none=True)
        parts = [f"{key}={value!r}" for key, value in named.items()]
        return f"[{self.index}] {self.family}: " + ", ".join(parts)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says of this entry: its models, family and family defaults."""
        from ..families import family

        defaults = self.models.resolve(self.family).model_dump(
            include={"width", "height", "num_inference_steps", "guidance_scale"}
        )
        row = family(self.family)
        return {
            "index": self.index,
            "family": self.family,
            **self.models.to_json(),
            "defaults": defaults,
            # FLUX.1: no FaceID adapter (its methods are the server's for its family) and no negative prompt
            "faceid_adapter": row.faceid_adapters,
            "negative_prompt": not row.guidance_embedded,
        }


def _names(source: str | None) -> set[str]:
    if source is None:
        return set()
    from ..model_set import _source_key

    return {source, _source_key(source)}


class Catalog:
    """The model sets of a server, the default first. ``find`` picks the one a request asks for."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self.entries = list(entries)
        if not self.entries:
            raise FaceIDError("a server needs at least one model set")
        for i, entry in enumerate(self.entries):
            for other in self.entries[:i]:
                if entry.matches(other.models) and other.matches(entry.models):
                    raise FaceIDError(f"model set {entry.label()} is configured twice")

    @property
    def default(self) -> ModelEntry:
        return self.entries[0]

    def find(self, requested: GenerationSettings) -> ModelEntry:
        """The first entry that has every model field ``requested`` names (none named: the default)."""
        for entry in self.entries:
            if entry.matches(requested):
                return entry
        named = {k: v for k, v in requested.model_dump(include=set(MODEL_FIELDS)).items() if v is not None}
        served = "; ".join(entry.label() for entry in self.entries)
        raise ModelNotServed(
            f"this server does not serve {named}: it serves {served}. Name one of these (GET /v1/models lists "
            "them) or leave the model fields out for the first"
        )


# ---------------------------------------------------------------------- one worker's loaded pipelines
@dataclass(eq=False)
class Loaded:
    pipeline: Any
    defaults: GenerationSettings  # ``pipeline.resolve_settings()`` taken while no call ran on it
    nbytes: int  # the pipeline's and its attached models'
    # models run with the pipeline, loaded with it (``Worker.equip``), by key: ControlNets by source, style adapters
    # by "style adapter NAME"; each a model, or the list of the modules it added to the pipeline
    attached: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class LoadedModels:
    """A worker's pipelines by catalog entry, least recently used first, within ``budget`` bytes.

    Loading an entry that does not fit evicts the least recently used ones; an entry larger than the whole
    budget still loads (alone), with a warning, rather than never running. Only the worker thread loads and
    evicts; request threads read what is loaded (under the lock). ``reserved``: the bytes of the models the worker
    keeps whatever model set runs (the control kinds' annotators), counted as used."""

    budget: int
    reserved: int = 0
    _loaded: OrderedDict[ModelEntry, Loaded] = field(default_factory=OrderedDict)
    # What each entry measured when this worker last loaded it: the room to make *before* loading it again.
    # A first load makes room after it, from its measured size.
    _sizes: dict[ModelEntry, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self, entry: ModelEntry, pipeline: Any, defaults: GenerationSettings, attached: dict[str, Any] | None = None
    ) -> Loaded:
        """File ``pipeline`` (and the models ``attached`` to it, loaded with it) under ``entry``, its memory counted."""
        attached = dict(attached or {})
        modules = [m for found in attached.values() for m in (found if isinstance(found, list) else [found])]
        loaded = Loaded(pipeline, defaults, modules_bytes([*pipeline_modules(pipeline), *modules]), attached)
        self._sizes[entry] = loaded.nbytes
        if loaded.nbytes > self.budget:
            logger.warning(
                "model set %s takes %.1f GB, more than the whole model memory budget (%.1f GB): it runs alone",
                entry.label(), loaded.nbytes / GB, self.budget / GB,
            )  # fmt: skip
        with self._lock:
            self._loaded[entry] = loaded
        self._make_room(0)
        return loaded

    def get(self, entry: ModelEntry, load: Callable[[], tuple]) -> Loaded:
        """``entry``'s pipeline, now the most recently used; ``load()`` -> (pipeline, defaults[, attached]) when not
        loaded."""
        with self._lock:
            found = self._loaded.get(entry)
            if found is not None:
                self._loaded.move_to_end(entry)
                return found
        self._make_room(self._sizes.get(entry, 0))
        return self.add(entry, *load())

    def _make_room(self, needed: int) -> None:
        """Evict least recently used pipelines until ``needed`` more bytes fit; the newest one always stays."""
        freed = []
        with self._lock:
            while len(self._loaded) > (0 if needed else 1) and self.used + needed > self.budget:
                entry, loaded = self._loaded.popitem(last=False)
                freed.append(_device_type(loaded.pipeline))
                logger.info("model set %s evicted (%.1f GB) to make room", entry.label(), loaded.nbytes / GB)
                del loaded
        if freed:
            gc.collect()  # the pipelines' tensors go with their last reference
            if "cuda" in freed:
                import torch

                torch.cuda.empty_cache()

    @property
    def used(self) -> int:
        return self.reserved + sum(loaded.nbytes for loaded in self._loaded.values())

    def holds(self, entry: ModelEntry | None) -> bool:
        with self._lock:
            return entry in self._loaded

    def entries(self) -> list[ModelEntry]:
        """Loaded entries, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def newest(self) -> Any:
        with self._lock:
            return next(reversed(self._loaded.values())).pipeline if self._loaded else None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "loaded_models": [entry.index for entry in self._loaded],
                "memory": {"budget_bytes": self.budget, "used_bytes": self.used},
            }


def pipeline_bytes(pipeline: Any) -> int:
    """The memory a ``FaceIDPipeline``'s weights take: the parameters and buffers of its diffusers components
    (with the LoRAs and attention branches loaded into them), its identity projection and its CLIP image encoder
    (each tensor once)."""
    return modules_bytes(pipeline_modules(pipeline))


def pipeline_modules(pipeline: Any) -> list:
    """The torch modules of a ``FaceIDPipeline`` whose weights ``pipeline_bytes`` counts."""
    import torch

    modules = [m for m in pipeline.pipe.components.values() if isinstance(m, torch.nn.Module)]
    if pipeline.adapter is not None:  # None: a model set without a FaceID adapter (FLUX.1)
        modules.append(pipeline.adapter.projection)
    if pipeline.image_encoder is not None:
        modules.append(pipeline.image_encoder.model)
    return modules


def modules_bytes(modules: Iterable[Any]) -> int:
    """The memory of the parameters and buffers of ``modules`` (torch modules; None skipped), each tensor once."""
    tensors = {id(t): t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def default_budget(device: Any) -> int:
    """The default model memory of a worker: a fraction of a CUDA device's memory, else of the system RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(DEVICE_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    return int(HOST_MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _device_type(pipeline: Any) -> str:
    try:
        return pipeline.device.type
    except Exception:  # not a FaceIDPipeline (a test's stand-in)
        return "cpu"


@dataclass(frozen=True)
class PipelineLoader:
    """What a worker loads, as paths and names (picklable): ``loader(device, models, analyzer)`` -> a
    ``FaceIDPipeline`` of the model set ``models`` (its model fields). ``faceid serve`` loads with it too."""

    vae_tiny: str | None = None  # --tiny-vae: every model set decodes previews (and, on request, images) with it
    base_config: str | None = None
    image_encoder: str | None = None
    dtype: str | None = None  # a torch dtype name: "float16"; None: fp16 on GPU, fp32 on CPU
    compile: bool = False
    # A FLUX.1 model set (no FaceID adapter) loads with the --method-weights methods of its family (the first is its
    # default method), the face models they read and its memory options; the others' methods are the worker's.
    face_models: str | None = None
    methods: tuple[tuple[str, str], ...] = ()
    offload: str | None = None  # --offload model|sequential
    quantize: str | None = None  # --quantize int8|fp8

    def __call__(self, device: str, models: GenerationSettings, analyzer: Any = None):
        import torch

        from ..model_set import family_without_adapter
        from ..pipeline import FaceIDPipeline
        from ..variants import DEFAULT_ADAPTER

        family = family_without_adapter(models.base_model, models.adapter)
        if family is not None:
            return FaceIDPipeline.from_pretrained(
                models.base_model,
                None,
                vae=models.vae,
                device=None if device == "default" else device,
                torch_dtype=getattr(torch, self.dtype) if self.dtype else None,
                face_analyzer=analyzer,
                face_models=self.face_models,
                progress=False,
                methods=methods_for(family, dict(self.methods)),
                offload=self.offload,
                quantize=self.quantize,
            )
        return FaceIDPipeline.from_pretrained(
            models.base_model,
            models.adapter or DEFAULT_ADAPTER,
            vae=models.vae,
            tiny_vae=self.vae_tiny,
            single_file_config=self.base_config,
            device=None if device == "default" else device,
            torch_dtype=getattr(torch, self.dtype) if self.dtype else None,
            face_analyzer=analyzer,
            image_encoder=self.image_encoder,
            loras=list((models.loras or {}).items()),
            progress=False,
            compile=self.compile,
        )  # the --method-weights methods are loaded by the worker onto the model sets they run on (Worker.equip)


def methods_for(family: str, methods: Mapping[str, str]) -> dict[str, str]:
    """The ``--method-weights`` methods that run on ``family``, in their order (the first: the default method of a
    model set without a FaceID adapter)."""
    from ..methods import METHODS

    return {name: folder for name, folder in methods.items() if family in METHODS[name].families}
