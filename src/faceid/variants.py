"""The one table of IP-Adapter-FaceID variants: what each is, what it needs, and where its files are.

Two kinds of rows, both here and nowhere else:

* ``ARCHITECTURES``: what a checkpoint's tensors can say and what training builds (``variant:`` in a
  training config): ``faceid``, ``plus``, ``plusv2``, ``portrait``. Tokens per face, LoRA rank, whether
  it needs the CLIP image encoder (perceiver), the shortcut default, how several photos of one person
  combine. Plus and PlusV2 have the same tensors; only the shortcut default tells them apart.
* ``VARIANTS``: the released models by name (``faceid-sd15`` ...), each an architecture on a base
  model family, with its files in ``h94/IP-Adapter-FaceID`` pinned to one Hub commit and their
  sha256, its image encoder (pinned too), and the base model (and VAE) the authors show it with.

``faceid.hub`` downloads and verifies the files (:func:`resolve_adapter` turns a released name into its
verified file); ``faceid.checkpoints.AdapterSpec`` matches a file's
tensors to the architecture rows; the pipeline, training and ``faceid models`` read their defaults here.

Sources of the pinned values (Hugging Face pages): the repository's commit list
(https://huggingface.co/h94/IP-Adapter-FaceID/commits/main, head ``43907e6``), and for every file the
Git LFS pointer (``oid sha256`` and ``size``) in the commit that uploaded it, e.g.
https://huggingface.co/h94/IP-Adapter-FaceID/commit/1cc4ea2507036f0125999c9fbf142b6b46b050c5 for
``ip-adapter-faceid_sd15.bin``. No file listed here changed after its upload except
``ip-adapter-faceid_sdxl_lora.safetensors`` (re-uploaded in ``309dc56``; the value is that one's).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingWeightsError
from .hub import HubFile, HubFolder, fetch

ADAPTER_REPO = "h94/IP-Adapter-FaceID"
# The head of h94/IP-Adapter-FaceID ("Upload ip-adapter-faceid-portrait_sdxl_unnorm.bin"); every file
# below is in this commit's tree (https://huggingface.co/h94/IP-Adapter-FaceID/tree/43907e6f44d0...).
ADAPTER_REVISION = "43907e6f44d079bf1a9102d9a6e56aef7a219bae"

# Cross-attention width -> base model family (SPEC.md: cad 768 for SD1.5, 2048 for SDXL).
FAMILIES = {768: "SD1.5", 2048: "SDXL"}


# CLIP ViT-H/14 (laion2B-s32B-b79K) as the Plus reference loads it. Pinned to h94/IP-Adapter commit
# 0859e80 ("Adding `safetensors` variant of this model (#1)"), the last one to touch
# models/image_encoder (its model.safetensors: sha256 6ca9667da1ca9e0b0f75e46bb030f7e011f44f86cbfb8d5a36590fcd7507b030,
# https://huggingface.co/h94/IP-Adapter/blob/94e28fff1b6932cada2f95358d7191eca2106001/models/image_encoder/model.safetensors).
CLIP_VIT_H = HubFolder("h94/IP-Adapter", "models/image_encoder", "0859e809306db97aa2338e370587ab284e8a754f")


@dataclass(frozen=True)
class Architecture:
    """What a variant's checkpoint holds and how it is used; the ``name`` is training's ``variant``."""

    name: str
    title: str  # as the authors write it: FaceID, Plus, PlusV2, Portrait
    tokens_per_face: int
    lora_rank: int | None  # the released files' rank; None: no LoRA
    needs_clip: bool  # a perceiver on CLIP ViT-H features of the aligned face (Plus)
    shortcut: bool  # PlusV2: tokens + s_scale * perceiver, on by default
    combine: str  # several photos of one person: "mean" of the embeddings, or "concat" of their tokens
    description: str

    @property
    def label(self) -> str:
        """``faceid``, ``faceid-plus``, ``faceid-portrait``: how files and metadata name the variant."""
        return "faceid" if self.name == "faceid" else f"faceid-{self.name}"

    def fits(self, needs_clip: bool, num_tokens: int, has_lora: bool) -> bool:
        return (
            self.needs_clip == needs_clip
            and self.tokens_per_face == num_tokens
            and (self.lora_rank is not None) == has_lora
        )


# The order matters once: the first row of each projection type (MLP: faceid; perceiver: plus) is
# what a file that fits no row exactly is taken for.
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "faceid",
            "FaceID",
            tokens_per_face=4,
            lora_rank=128,
            needs_clip=False,
            shortcut=False,
            combine="mean",
            description="face embedding + LoRA",
        ),
        Architecture(
            "plus",
            "Plus",
            tokens_per_face=4,
            lora_rank=128,
            needs_clip=True,
            shortcut=False,
            combine="mean",
            description="face embedding + CLIP face features (perceiver) + LoRA",
        ),
        Architecture(
            "plusv2",
            "PlusV2",
            tokens_per_face=4,
            lora_rank=128,
            needs_clip=True,
            shortcut=True,
            combine="mean",
            description="Plus with the shortcut on, tokens + s_scale * perceiver: s_scale weighs the face structure",
        ),
        Architecture(
            "portrait",
            "Portrait",
            tokens_per_face=16,
            lora_rank=None,
            needs_clip=False,
            shortcut=False,
            combine="concat",
            description="several photos of one person, their tokens concatenated",
        ),
    )
}


def match_architectures(needs_clip: bool, num_tokens: int, has_lora: bool) -> tuple[Architecture, ...]:
    """The rows a checkpoint with these tensors fits exactly (Plus and PlusV2 both, for a Plus file)."""
    return tuple(a for a in ARCHITECTURES.values() if a.fits(needs_clip, num_tokens, has_lora))


def closest_architecture(needs_clip: bool, num_tokens: int, has_lora: bool, name: str = "") -> Architecture:
    """The row to take a checkpoint for: an exact fit (among several, the one whose name ``name``, e.g.
    the file name, contains: ``...plusv2...`` is PlusV2), else the first row of its projection type."""
    fits = match_architectures(needs_clip, num_tokens, has_lora)
    if not fits:
        return next(a for a in ARCHITECTURES.values() if a.needs_clip == needs_clip)
    flat = name.lower().replace("_", "").replace("-", "")
    named = [a for a in fits if a.name in flat]
    return max(named, key=lambda a: len(a.name)) if named else fits[0]


@dataclass(frozen=True)
class VariantSpec:
    """A released model by name: its architecture on one base model family, and its files."""

    name: str
    architecture: Architecture
    family: str  # "SD1.5" or "SDXL"
    adapter: HubFile
    lora: HubFile | None  # the separate *_lora.safetensors twin, where released
    base_model: str  # the base model the authors show it with
    vae: str | None = None
    description: str = ""

    # The architecture's facts, read through the release.
    @property
    def tokens_per_face(self) -> int:
        return self.architecture.tokens_per_face

    @property
    def lora_rank(self) -> int | None:
        return self.architecture.lora_rank

    @property
    def needs_clip(self) -> bool:
        return self.architecture.needs_clip

    @property
    def shortcut(self) -> bool:
        return self.architecture.shortcut

    @property
    def combine(self) -> str:
        return self.architecture.combine

    @property
    def image_encoder(self) -> HubFolder | None:
        return CLIP_VIT_H if self.needs_clip else None

    @property
    def files(self) -> tuple[HubFile, ...]:
        return (self.adapter,) + ((self.lora,) if self.lora else ())


def _file(filename: str, sha256: str, size: int) -> HubFile:
    return HubFile(ADAPTER_REPO, filename, ADAPTER_REVISION, sha256, size)


# The authors' demos: Realistic Vision 4.0 with the sd-vae-ft-mse VAE for SD1.5, RealVisXL 3.0 for SDXL.
_SD15 = {"family": "SD1.5", "base_model": "SG161222/Realistic_Vision_V4.0_noVAE", "vae": "stabilityai/sd-vae-ft-mse"}
_SDXL = {"family": "SDXL", "base_model": "SG161222/RealVisXL_V3.0"}
_A = ARCHITECTURES

# (sha256, size) of each file: the Git LFS pointer in the commit named after it.
VARIANTS: dict[str, VariantSpec] = {
    v.name: v
    for v in (
        VariantSpec(
            "faceid-sd15",
            _A["faceid"],
            adapter=_file(  # 1cc4ea2
                "ip-adapter-faceid_sd15.bin",
                "201344e22e6f55849cf07ca7a6e53d8c3b001327c66cb9710d69fd5da48a8da7",
                96740574,
            ),
            lora=_file(  # f330ff9 ("faceid lora (#3)")
                "ip-adapter-faceid_sd15_lora.safetensors",
                "70699f0dbfadd47de1f81d263cf4c86bd4b7271d841304af9b340b3a7f38e86a",
                51059544,
            ),
            **_SD15,
            description=_A["faceid"].description,
        ),
        VariantSpec(
            "faceid-plus-sd15",
            _A["plus"],
            adapter=_file(  # 14cc67f
                "ip-adapter-faceid-plus_sd15.bin",
                "252fb53e0d018489d9e7f9b9e2001a52ff700e491894011ada7cfb471e0fadf2",
                156558503,
            ),
            lora=_file(  # 500c74d
                "ip-adapter-faceid-plus_sd15_lora.safetensors",
                "3f00341d11e5e7b5aadf63cbdead09ef82eb28669156161cf1bfc2105d4ff1cd",
                51059544,
            ),
            **_SD15,
            description=_A["plus"].description,
        ),
        VariantSpec(
            "faceid-plusv2-sd15",
            _A["plusv2"],
            adapter=_file(  # f4b55f9
                "ip-adapter-faceid-plusv2_sd15.bin",
                "26d0d86a1d60d6cc811d3b8862178b461e1eeb651e6fe2b72ba17aa95411e313",
                156558509,
            ),
            lora=_file(  # b7db0a4
                "ip-adapter-faceid-plusv2_sd15_lora.safetensors",
                "8abff87a15a049f3e0186c2e82c1c8e77783baf2cfb63f34c412656052eb57b0",
                51059544,
            ),
            **_SD15,
            description=_A["plusv2"].description,
        ),
        VariantSpec(
            "faceid-portrait-sd15",
            _A["portrait"],
            adapter=_file(  # 8e5e426
                "ip-adapter-faceid-portrait_sd15.bin",
                "68570f3c14fe125b00d4abf416af33d8b13bb496f4e55af2eb5d0a6017ee99a4",
                64586611,
            ),
            lora=None,
            **_SD15,
            description=_A["portrait"].description,
        ),
        VariantSpec(
            "faceid-portrait-v11-sd15",
            _A["portrait"],
            adapter=_file(  # f6494dd
                "ip-adapter-faceid-portrait-v11_sd15.bin",
                "a48cb4f89ed18e02c6000f65aa9efec452e87eaed4a1bc9fcf4a460c8d0e3bc6",
                64586623,
            ),
            lora=None,
            **_SD15,
            description="Portrait, version 1.1",
        ),
        VariantSpec(
            "faceid-sdxl",
            _A["faceid"],
            adapter=_file(  # d638c8c
                "ip-adapter-faceid_sdxl.bin",
                "f455fed24e207c878ec1e0466b34a969d37bab857c5faa4e8d259a0b4ff63d7e",
                1071149741,
            ),
            lora=_file(  # 309dc56 (re-upload; the first upload, 2055a7a, was 2ade2b53...)
                "ip-adapter-faceid_sdxl_lora.safetensors",
                "4fcf93d6e8dc8dd18f5f9e51c8306f369486ed0aa0780ade9961308aff7f0d64",
                371842896,
            ),
            **_SDXL,
            description="face embedding + LoRA, SDXL",
        ),
        VariantSpec(
            "faceid-plusv2-sdxl",
            _A["plusv2"],
            adapter=_file(  # 36ce7f9
                "ip-adapter-faceid-plusv2_sdxl.bin",
                "c6945d82b543700cc3ccbb98d363b837e9c596281607857c74b713a876daf5fb",
                1487555181,
            ),
            lora=_file(  # 6eba56f
                "ip-adapter-faceid-plusv2_sdxl_lora.safetensors",
                "f24b4bb2dad6638a09c00f151cde84991baf374409385bcbab53c1871a30cb7b",
                371842896,
            ),
            **_SDXL,
            description="PlusV2 for SDXL",
        ),
        VariantSpec(
            "faceid-portrait-sdxl",
            _A["portrait"],
            adapter=_file(  # 82fff82
                "ip-adapter-faceid-portrait_sdxl.bin",
                "5631ce7824cdafd2db37c5e85b985730a95ff59c5b4fc80c2b79b0bee5711512",
                749822515,
            ),
            lora=None,
            **_SDXL,
            description="Portrait for SDXL",
        ),
    )
}
DEFAULT_ADAPTER = "faceid-sd15"


def released(adapter: str | object) -> VariantSpec | None:
    """The release named ``adapter``, or the one whose adapter or LoRA file name it has (a downloaded copy)."""
    name = str(adapter)
    if name in VARIANTS:
        return VARIANTS[name]
    filename = Path(name).name
    return next((v for v in VARIANTS.values() if filename in {f.filename for f in v.files}), None)


def releases_like(architectures: Iterable[Architecture], family: str | None) -> list[VariantSpec]:
    """The releases of these architectures for ``family`` (all families when None)."""
    names = {a.name for a in architectures}
    return [v for v in VARIANTS.values() if v.architecture.name in names and family in (None, v.family)]


def resolve_adapter(adapter: str | os.PathLike) -> Path:
    """A local adapter file, or a released adapter's name (downloaded once into the Hub cache, verified)."""
    path = Path(adapter).expanduser()
    if path.is_file():
        return path
    name = str(adapter)
    if name in VARIANTS:
        return fetch(VARIANTS[name].adapter)
    if path.suffix in (".bin", ".safetensors") or os.sep in name:
        raise MissingWeightsError(
            f"adapter file not found: {path}. Give the path of an IP-Adapter-FaceID .bin/.safetensors file "
            f"or one of the released names: {', '.join(VARIANTS)}"
        )
    raise MissingWeightsError(
        f"unknown adapter {name!r}: give a file path or one of {', '.join(VARIANTS)} (see `faceid models`)"
    )
