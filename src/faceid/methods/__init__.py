"""Identity methods beside IP-Adapter-FaceID: InstantID, PuLID and InfiniteYou, each a piece on the same seams.

A method says what it needs from a face (which insightface pack embeds it, keypoints, a parsed crop), what it
makes of it (identity tokens, a ControlNet, attention pieces in the denoiser) and how that enters the base model
for one call. Each lives in its own module; this package's table, ``METHODS``, lists them with their released
files and licences, as ``faceid.variants`` lists the FaceID variants: what ``GenerationSettings.method`` accepts,
what ``faceid models`` shows, and what a request is checked against before any work (``check_method``).

Base families are named by string (``"SDXL"``, ``"FLUX.1"``): ``faceid.families`` holds their rows.

Where the pinned figures come from (each row's comment says which):

* insightface's ``antelopev2.zip`` (the v0.7 release asset): sha256 and size as other projects pin them, the same
  in all (LibrePhotos' model catalogue, several installers that check the archive before unzipping), and the
  archive's members measured after unzipping in one of them (``glintr100.onnx``, ``scrfd_10g_bnkps.onnx``, byte
  for byte buffalo_l's ``det_10g.onnx``); see ``faceid.faces.model_files.FACE_PACKS``.
* The Hugging Face files of InstantX/InstantID, guozinan/PuLID and QuanSun/EVA-CLIP: their commits and sha256 as
  other projects pin them (download scripts and installers that fetch ``resolve/<commit>/<file>`` and check the
  sha256 after; model catalogues that list a file's hash and size; Hub LFS download addresses, whose last segment
  is the file's LFS oid), two or more agreeing for each value unless a row's comment says otherwise. Every download
  is checked against the sha256, so a wrong value can only refuse a file, never let another one in.
* ByteDance/InfiniteYou's files: no commit was found in any source this project could read, so they are left
  **unknown** (``revision=None``, ``sha256=None``): :func:`fetch_method_file` refuses such a file (it would be an
  unchecked download of whatever the repository's main holds) and says to pass a local copy instead. Fill in a
  row from the file's Hub page (its commit list, and the ``oid sha256`` / ``size`` of the LFS pointer) to pin it.
* facexlib's release assets (BiSeNet for PuLID, IR-SE50 for InfiniteYou) are GitHub release files: pinned by their
  tag's address and sha256 (``ReleaseAsset``, fetched by ``faceid.hub.fetch_asset``); the sha256 as several
  installers and packagers (an AUR PKGBUILD of facexlib among them) check it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import CheckpointError, FaceIDError
from ..hub import HubFile, ReleaseAsset

__all__ = [
    "DEFAULT_METHOD",
    "LICENCES",
    "METHODS",
    "IdentityMethod",
    "Licence",
    "check_method",
    "fetch_method_file",
    "identity_method",
    "refuse_unwired",
    "unpinned_files",
]


@dataclass(frozen=True)
class Licence:
    """The terms a model is released under."""

    name: str
    url: str
    commercial: bool  # whether commercial use is allowed

    def __str__(self) -> str:
        said = self.commercial or "non-commercial" in self.name.lower()
        return self.name if said else f"{self.name} (non-commercial)"


LICENCES: dict[str, Licence] = {
    "apache-2.0": Licence("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0", True),
    "mit": Licence("MIT", "https://opensource.org/license/mit", True),
    "cc-by-nc-4.0": Licence("CC BY-NC 4.0", "https://creativecommons.org/licenses/by-nc/4.0/", False),
    "insightface": Licence(
        "insightface models: non-commercial research only",
        "https://github.com/deepinsight/insightface/tree/master/model_zoo",
        False,
    ),
    "ip-adapter-faceid": Licence(
        "IP-Adapter-FaceID: non-commercial research only", "https://huggingface.co/h94/IP-Adapter-FaceID", False
    ),
    "flux-1-dev": Licence(
        "FLUX.1 [dev] Non-Commercial License",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
        False,
    ),
}
_L = LICENCES


@dataclass(frozen=True)
class IdentityMethod:
    """One identity method: the base families it runs on, what it needs from a face, its released files and the
    licences of its weights and of the models it needs (``licences``: what -> licence)."""

    name: str  # as the user writes it: GenerationSettings.method, --method
    title: str
    families: tuple[str, ...]  # faceid.families names
    face_pack: str  # the insightface pack that finds (and, for most, embeds) the face: buffalo_l or antelopev2
    recognizer: str  # what turns the aligned face into the identity vector
    normalised: bool  # whether the method feeds the L2-normalised embedding (else the recognizer's raw vector)
    face_inputs: tuple[str, ...]  # what else it reads of a face, besides the embedding
    files: tuple[HubFile, ...]  # released files every use needs
    licences: tuple[tuple[str, Licence], ...]
    model_sets: Mapping[str, tuple[HubFile, ...]] = field(default_factory=dict)  # more files, one set chosen
    wired: bool = False  # whether generation runs it yet
    description: str = ""
    # The method's own defaults of generation settings (its authors' app), which win over the loaded FaceID
    # adapter's: InstantID's IP scale and IdentityNet scale.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # The key of ``Face.embeddings`` it reads when that is not its face pack's recognizer (InfiniteYou: facexlib's
    # IR-SE50, ``irse50``); what a server's enrolled faces must keep for it (``embedding_key``).
    embedded_by: str | None = None
    # Files it needs that are released outside the Hub (facexlib's GitHub release assets).
    assets: tuple[ReleaseAsset, ...] = ()

    @property
    def embedding_key(self) -> str:
        """The ``Face.embeddings`` key of the vector the method reads: its own recognizer's, else its pack's."""
        return self.embedded_by or self.face_pack

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_sets", MappingProxyType(dict(self.model_sets)))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def default_model_set(self) -> str | None:
        return next(iter(self.model_sets), None)

    def files_for(self, model_set: str | None = None) -> tuple[HubFile, ...]:
        """The files a use of the method needs: its own and those of one model set (default: the first)."""
        if not self.model_sets:
            return self.files
        chosen = model_set or self.default_model_set
        if chosen not in self.model_sets:
            raise FaceIDError(
                f"{self.name} has no model set {chosen!r}: {', '.join(self.model_sets)} (released by its authors)"
            )
        return self.files + self.model_sets[chosen]

    @property
    def all_files(self) -> tuple[HubFile, ...]:
        return self.files + tuple(f for files in self.model_sets.values() for f in files)

    @property
    def unpinned(self) -> tuple[HubFile, ...]:
        """Its released files whose commit or sha256 is not known (``fetch_method_file`` refuses them): none means
        faceid can fetch and check everything it needs (its folder is then optional)."""
        return tuple(f for f in self.all_files if f.revision is None or f.sha256 is None)

    @property
    def commercial(self) -> bool:
        """Whether everything it loads allows commercial use."""
        return all(licence.commercial for _, licence in self.licences)

    def licence_text(self) -> str:
        return "; ".join(f"{what}: {licence}" for what, licence in self.licences)

    def licence_record(self) -> dict[str, Any]:
        """What an image made with the method records of its terms (``faceid.results``): each part's licence and
        its address, and whether all of it allows commercial use."""
        return {
            "licences": {what: f"{licence} <{licence.url}>" for what, licence in self.licences},
            "commercial_use": self.commercial,
        }


def _pinned(repo: str, path: str, revision: str, sha256: str, size: int | None = None) -> HubFile:
    folder, _, filename = path.rpartition("/")
    return HubFile(repo, filename, revision=revision, sha256=sha256, size=size, subfolder=folder or None)


def _unpinned(repo: str, path: str, size: int | None = None) -> HubFile:
    """A released Hub file whose commit and sha256 are not known (see the module): refused by fetch_method_file."""
    folder, _, filename = path.rpartition("/")
    return HubFile(repo, filename, revision=None, sha256=None, size=size, subfolder=folder or None)


INSTANTID_REPO = "InstantX/InstantID"
PULID_REPO = "guozinan/PuLID"
INFINITEYOU_REPO = "ByteDance/InfiniteYou"
EVA_CLIP_REPO = "QuanSun/EVA-CLIP"

INSTANTID_COMMIT = "57b32dfee076092ad2930c71fd6d439c2c3b1820"
# The commit that holds pulid_v1.1.safetensors (one source for the commit; the sha256 and size have several). PuLID-
# FLUX v0.9.1 came out in the same repository before v1.1 and no source names a commit for it: it is fetched at this
# one too, checked against its own sha256 (a commit without it is a failed download, never another file).
PULID_COMMIT = "d58b3ba191be1280c37ace0656a2e65cd9b8c8d8"

# EVA02-CLIP-L/14 at 336 px, the visual tower PuLID reads the parsed face crop with (MIT, BAAI's EVA).
EVA02_CLIP_L = _pinned(
    EVA_CLIP_REPO,
    "EVA02_CLIP_L_336_psz14_s6B.pt",
    "11afd202f2ae80869d6cef18b1ec775e79bd8d12",
    "84c3a17a228c567a155259b2245b0b59072bf7da510260a0a02ec54de6d50b05",
    856461210,
)

# facexlib's BiSeNet face parser (PuLID's background removal), release v0.2.0 (v0.2.2 holds ParseNet, another file).
PARSING_BISENET = ReleaseAsset(
    "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
    "468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
    53289463,
)
# facexlib's ArcFace IR-SE50 (InfiniteYou's recognizer), release v0.1.0. Its size is left out: two sources that
# check it say 175,367,323 bytes, one says 175,004,821; the sha256 decides.
IRSE50_WEIGHTS = ReleaseAsset(
    "https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth",
    "a035c768259b98ab1ce0e646312f48b9e1e218197a0f80ac6765e88f8b6ddf28",
)


def _infuse_net(model_set: str) -> tuple[HubFile, ...]:
    """One InfiniteYou model set: its projection and InfuseNet (a diffusers FluxControlNetModel folder in two
    shards), as the authors' snapshot_download lays them out."""
    base = f"infu_flux_v1.0/{model_set}"
    return (
        _unpinned(INFINITEYOU_REPO, f"{base}/image_proj_model.bin"),
        _unpinned(INFINITEYOU_REPO, f"{base}/InfuseNetModel/config.json"),
        _unpinned(INFINITEYOU_REPO, f"{base}/InfuseNetModel/diffusion_pytorch_model.safetensors.index.json"),
        _unpinned(INFINITEYOU_REPO, f"{base}/InfuseNetModel/diffusion_pytorch_model-00001-of-00002.safetensors"),
        _unpinned(INFINITEYOU_REPO, f"{base}/InfuseNetModel/diffusion_pytorch_model-00002-of-00002.safetensors"),
    )


_ANTELOPE = ("insightface antelopev2 (face models)", _L["insightface"])
_FLUX_DEV = ("FLUX.1-dev (base model)", _L["flux-1-dev"])
_EVA = ("EVA02-CLIP-L (QuanSun/EVA-CLIP)", _L["mit"])
_FACEXLIB = ("facexlib (face parsing and alignment helpers)", _L["mit"])

METHODS: dict[str, IdentityMethod] = {
    m.name: m
    for m in (
        IdentityMethod(
            "faceid",
            "IP-Adapter-FaceID",
            families=("SD1.5", "SDXL"),
            face_pack="buffalo_l",
            recognizer="w600k_r50.onnx (buffalo_l ArcFace)",
            normalised=True,
            face_inputs=("Plus variants: CLIP ViT-H features of the 224x224 aligned face",),
            files=(),  # the variant's files: faceid.variants (--adapter), pinned there
            licences=(
                ("IP-Adapter-FaceID weights (h94/IP-Adapter-FaceID)", _L["ip-adapter-faceid"]),
                ("insightface buffalo_l (face models)", _L["insightface"]),
            ),
            wired=True,
            description="IP-Adapter-FaceID in its released variants (faceid.variants, --adapter)",
        ),
        IdentityMethod(
            "instantid",
            "InstantID",
            families=("SDXL",),
            face_pack="antelopev2",
            recognizer="glintr100.onnx (antelopev2 ArcFace)",
            normalised=False,  # the raw face_info['embedding'] (FORMAT.md of the golden data)
            face_inputs=("keypoint image (the 5 landmarks drawn, IdentityNet's control image)",),
            files=(
                _pinned(
                    INSTANTID_REPO,
                    "ip-adapter.bin",
                    INSTANTID_COMMIT,
                    "02b3618e36d803784166660520098089a81388e61a93ef8002aa79a5b1c546e1",
                    1691134141,
                ),
                # a small file kept in plain git (no LFS pointer): its sha256 as one download script checks it
                _pinned(
                    INSTANTID_REPO,
                    "ControlNetModel/config.json",
                    INSTANTID_COMMIT,
                    "2480c42f363d712faae8d0e17cb850a5d1e4cafc232fbd022b1d43eee45234eb",
                ),
                _pinned(
                    INSTANTID_REPO,
                    "ControlNetModel/diffusion_pytorch_model.safetensors",
                    INSTANTID_COMMIT,
                    "c8127be9f174101ebdafee9964d856b49b634435cf6daa396d3f593cf0bbbb05",
                    2502139136,
                ),
            ),
            licences=(("InstantID weights (InstantX/InstantID)", _L["apache-2.0"]), _ANTELOPE),
            wired=True,
            description="IdentityNet (a ControlNet on the face keypoints, its context the identity tokens) + its "
            "IP-Adapter (a Resampler over the antelopev2 embedding)",
            # The authors' app (gradio_demo/app.py): IP-Adapter scale 0.8, IdentityNet strength 0.8.
            defaults={"scale": 0.8, "identitynet_scale": 0.8},
        ),
        IdentityMethod(
            "pulid",
            "PuLID v1.1",
            families=("SDXL",),
            face_pack="antelopev2",
            recognizer="glintr100.onnx (antelopev2 ArcFace)",
            normalised=False,
            face_inputs=("EVA02-CLIP-L features of the parsed (background-removed) aligned face crop",),
            files=(
                _pinned(
                    PULID_REPO,
                    "pulid_v1.1.safetensors",
                    PULID_COMMIT,
                    "4cb8ceec1078e0165399b88332ab3c5971619111b8e1730e6bae64144aabae41",
                    984405232,
                ),
                EVA02_CLIP_L,
            ),
            assets=(PARSING_BISENET,),
            licences=(("PuLID weights (guozinan/PuLID)", _L["apache-2.0"]), _EVA, _ANTELOPE, _FACEXLIB),
            wired=True,
            description="the ID encoder (antelopev2 embedding + EVA02-CLIP-L features of the parsed face) and its "
            "attention in the SDXL UNet; its folder also holds facexlib's parsing_bisenet.pth",
            # The authors' app (app_v1_1.py): ID scale 0.8, num_zero 20, ortho v2 (methods.pulid.V11_NUM_ZERO/V11_ORTHO).
            defaults={"scale": 0.8, "pulid_num_zero": 20, "pulid_ortho": "v2"},
        ),
        IdentityMethod(
            "pulid-flux",
            "PuLID-FLUX v0.9.1",
            families=("FLUX.1",),
            face_pack="antelopev2",
            recognizer="glintr100.onnx (antelopev2 ArcFace)",
            normalised=False,
            face_inputs=("EVA02-CLIP-L features of the parsed (background-removed) aligned face crop",),
            # its size is not known to the byte (1.14 GB); the sha256 as several projects pin it
            files=(
                _pinned(
                    PULID_REPO,
                    "pulid_flux_v0.9.1.safetensors",
                    PULID_COMMIT,
                    "92c41c3af322b02e58e1b32842e4601e08c8f16ec1fe80089dbe957df510f51d",
                ),
                EVA02_CLIP_L,
            ),
            assets=(PARSING_BISENET,),
            licences=(("PuLID weights (guozinan/PuLID)", _L["apache-2.0"]), _EVA, _ANTELOPE, _FACEXLIB, _FLUX_DEV),
            wired=True,
            description="the ID encoder (antelopev2 embedding + EVA02-CLIP-L features of the parsed face) and its "
            "cross-attention after the FLUX.1 transformer's blocks (every 2nd double, every 4th single); its folder "
            "also holds EVA02_CLIP_L_336_psz14_s6B.pt and facexlib's parsing_bisenet.pth",
            # The authors' app (app_flux.py): id_weight 1.0 (faceid's ``scale``), start step 0, true CFG 1 (off), and
            # with true CFG on, timestep_to_start_cfg 1 (the first step without the negative pass).
            defaults={"scale": 1.0, "true_cfg_start": 1},
        ),
        IdentityMethod(
            "infiniteyou",
            "InfiniteYou-FLUX v1.0",
            families=("FLUX.1",),
            face_pack="antelopev2",  # detection and landmarks; the embedding is facexlib's ArcFace (below)
            recognizer="facexlib ArcFace IR-SE50 (recognition_arcface_ir_se50.pth)",
            embedded_by="irse50",  # faceid.faces.irse50.IRSE50_KEY
            assets=(IRSE50_WEIGHTS,),
            normalised=True,  # facexlib's backbone ends in an L2 norm
            face_inputs=("keypoint image of a control photo (InfuseNet's control image; black when none)",),
            files=(),
            model_sets={"aes_stage2": _infuse_net("aes_stage2"), "sim_stage1": _infuse_net("sim_stage1")},
            licences=(
                ("InfiniteYou weights (ByteDance/InfiniteYou)", _L["cc-by-nc-4.0"]),
                _ANTELOPE,
                ("facexlib ArcFace weights", _L["mit"]),
                _FLUX_DEV,
            ),
            description="the recognizer embedding projected into identity tokens, and InfuseNet (a FLUX "
            "ControlNet fed those tokens); model sets aes_stage2 (default, aesthetics) and sim_stage1 (likeness)",
            wired=True,
            # The authors' app (app.py): InfuseNet's conditioning scale 1.0 (faceid's ``scale``), over every step.
            defaults={"scale": 1.0},
        ),
    )
}
DEFAULT_METHOD = "faceid"


def identity_method(name: str) -> IdentityMethod:
    """The table's row ``name``, or a FaceIDError listing the methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise FaceIDError(f"unknown identity method {name!r}: {', '.join(METHODS)} (see `faceid models`)") from None


def unpinned_files() -> list[HubFile]:
    """Every released file of the table whose commit or sha256 is not known."""
    seen: dict[tuple[str, str], HubFile] = {}
    for method in METHODS.values():
        for file in method.unpinned:
            seen.setdefault((file.repo, file.path_in_repo), file)
    return list(seen.values())


def fetch_method_file(file: HubFile) -> Path:
    """A method's released file, downloaded at its pinned commit and checked against its sha256; a file the table
    does not pin (no commit or no sha256) is refused before anything is downloaded."""
    if file.revision is None or file.sha256 is None:
        missing = " and ".join(
            what for what, value in (("commit", file.revision), ("sha256", file.sha256)) if value is None
        )
        raise CheckpointError(
            f"{file.path_in_repo} from {file.repo} is unpinned in faceid's method table (its {missing} is not "
            f"known), so faceid does not download it: download it yourself "
            f"(https://huggingface.co/{file.repo}/blob/main/{file.path_in_repo}), check it, and pass the local "
            "file or folder instead"
        )
    from ..hub import fetch

    return fetch(file)


def check_method(
    name: str, family: str, face_models: str | Path | None = None, packs_at_hand: frozenset[str] = frozenset()
) -> IdentityMethod:
    """Refuse ``name`` on a base model of ``family``, or without its face pack, before any work: each message
    names what to load or download. ``face_models``: the folder face analysis reads (None: faceid's cache);
    ``packs_at_hand``: the packs a loaded face analyzer already has (no check needed)."""
    method = identity_method(name)
    if family not in method.families:
        raise FaceIDError(
            f"method {name} ({method.title}) runs on {' or '.join(method.families)} base models, and this "
            f"pipeline's base model is {family}: load a {' or '.join(method.families)} base model "
            f"(--base-model), or choose a method for {family} ("
            + ", ".join(m.name for m in METHODS.values() if family in m.families)
            + ")"
        )
    # buffalo_l: face analysis downloads it on first use, as it always has.
    if method.face_pack != "buffalo_l" and method.face_pack not in packs_at_hand:
        from ..faces.model_files import face_pack_ready

        face_pack_ready(method.face_pack, face_models, what=f"method {name}")
    return method


def refuse_unwired(method: IdentityMethod) -> None:
    """A method generation does not run yet is refused, never silently run as FaceID."""
    if method.wired:
        return
    files = method.files_for()
    needs = f"; it will need {', '.join(f.path_in_repo for f in files)} from {files[0].repo}" if files else ""
    raise FaceIDError(
        f"method {method.name} ({method.title}) is not wired into generation yet: this faceid generates with "
        f"{', '.join(m.name for m in METHODS.values() if m.wired)} only{needs} (`faceid models`). Leave method "
        "out (or method='faceid', --method faceid)"
    )
