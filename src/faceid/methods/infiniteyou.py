"""InfiniteYou (FLUX.1): the recognizer embedding projected into identity tokens, and InfuseNet, a FLUX
ControlNet that reads them in place of text.

InfiniteYou (ByteDance, ``github:bytedance/InfiniteYou``) leaves FLUX.1's transformer and its text untouched.
The face's ArcFace embedding (L2-normalised, 512-d) goes through a ``Resampler`` (IP-Adapter-Plus's perceiver:
faceid's :class:`~faceid.projection.ImageResampler`) into 8 identity tokens of the text width (4096). InfuseNet,
a diffusers :class:`~diffusers.FluxControlNetModel` (4 double and 10 single blocks), attends to those tokens
where a ControlNet would attend to the prompt, and to a control image (the face's 5 keypoints drawn on black,
or all black), and adds its residuals to the transformer's blocks. Per step:

* InfuseNet gets the latents, the VAE-encoded and packed control image, ``conditioning_scale``, the timestep,
  **its own guidance 1.0** (the transformer gets the user's, 3.5 by default), the text's pooled projection,
  ``encoder_hidden_states`` = the identity tokens and ``txt_ids`` = zeros of their count;
* the transformer gets the prompt as usual and the residuals (``controlnet_blocks_repeat=False``: diffusers'
  ``ceil`` interval maps 4 samples onto 19 double blocks and 10 onto 38 single ones).

Released layout (``ByteDance/InfiniteYou``), one folder per model set, both the same layout:
``infu_flux_v1.0/aes_stage2/`` (aesthetics) and ``infu_flux_v1.0/sim_stage1/`` (identity similarity), each with
``image_proj_model.bin`` (``{"image_proj": Resampler state dict}``) and ``InfuseNetModel/`` (a diffusers
folder). Both load strictly: a missing or extra key is a :class:`~faceid.errors.CheckpointError` naming it.

What a call uses, all made per call and never stored on the loaded modules:

* :meth:`InfiniteYou.identity_tokens`: embeddings -> tokens (several embeddings of one person are one identity:
  the Resampler reads them all, as the authors' ``reshape([1, -1, 512])``);
* :meth:`InfiniteYou.controlnet`: an :class:`InfuseNetCall` holding one call's tokens, to give a stock diffusers
  ``FluxControlNetPipeline`` as its ``controlnet`` (with ``control_image=[image]`` and
  ``controlnet_conditioning_scale=[scale]``; see the class);
* :func:`denoise_step`: one step without a pipeline (InfuseNet, then the transformer);
* :func:`control_image`: the authors' control image from a photo's keypoints, or black; :func:`fit_photo`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxControlNetModel
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel
from PIL import Image

from ..adapter import load_strict
from ..checkpoints import check_loading_report, load_state_dict, loading_error, perceiver_config
from ..control import draw_kps
from ..errors import CheckpointError, FaceIDError
from ..faces.irse50 import IRSE50, IRSE50_FILE, IRSE50_KEY, load_irse50
from ..projection import ImageResampler

__all__ = [
    "EMBEDDING_DIM",
    "IMAGE_PROJ_FILE",
    "INFUSENET_FOLDER",
    "INFUSENET_GUIDANCE",
    "MODEL_SETS",
    "InfiniteYou",
    "InfuseNetCall",
    "StepOutput",
    "control_image",
    "denoise_step",
    "fit_photo",
    "infusenet_residuals",
    "load_image_proj",
    "load_infusenet",
    "model_set_folder",
]

MODEL_SETS = ("aes_stage2", "sim_stage1")  # the released model sets under infu_flux_v1.0/
IMAGE_PROJ_FILE = "image_proj_model.bin"
INFUSENET_FOLDER = "InfuseNetModel"
EMBEDDING_DIM = 512  # the ArcFace embedding the Resampler reads
INFUSENET_GUIDANCE = 1.0  # InfUFluxPipeline's controlnet_guidance_scale: InfuseNet's own, not the transformer's


# ----------------------------------------------------------------------------------------------- loading


def load_image_proj(path: str | Path) -> ImageResampler:
    """``image_proj_model.bin`` -> the Resampler, its sizes read off its tensors (width, queries, depth, heads,
    output width), loaded strictly."""
    path = Path(path)
    proj = load_state_dict(path, groups=("image_proj",), kind="InfiniteYou image projection")["image_proj"]
    try:
        latents, proj_out = proj["latents"], proj["proj_out.weight"]
        config = perceiver_config(proj, "", latents.shape[-1])
    except KeyError as exc:
        raise CheckpointError(f"{path.name}: its Resampler lacks {exc.args[0]!r}") from None
    if config.clip_dim != EMBEDDING_DIM:
        raise CheckpointError(
            f"{path.name}: its Resampler reads {config.clip_dim}-d inputs, not the {EMBEDDING_DIM}-d ArcFace "
            "embedding InfiniteYou's is made for; is it an InfiniteYou image_proj_model.bin?"
        )
    resampler = ImageResampler(latents.shape[-1], config, latents.shape[1], proj_out.shape[0])
    load_strict(resampler, proj, path.name)
    return resampler.eval()


def load_infusenet(folder: str | Path, torch_dtype: torch.dtype | None = None) -> FluxControlNetModel:
    """``InfuseNetModel/`` -> the FluxControlNetModel, every key of its weights and no other (diffusers alone
    would only warn and initialise missing weights at random)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"InfuseNet not found: {folder} has no config.json (the released InfuseNetModel/)")
    what, advice = f"InfuseNet in {folder}", "use the released InfuseNetModel/ folder of its model set"
    try:
        dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
        infusenet, info = FluxControlNetModel.from_pretrained(str(folder), output_loading_info=True, **dtype)
    except Exception as exc:  # unreadable weights, a tensor of another shape
        raise loading_error(exc, what, advice) from exc
    check_loading_report(info, what, advice)
    if infusenet.input_hint_block is not None or infusenet.union:
        raise CheckpointError(
            f"{folder} is a FLUX ControlNet of another kind (an input hint block or union modes): InfuseNet reads the "
            "VAE-encoded control image and no mode"
        )
    return infusenet.eval()


def model_set_folder(source: str | Path | None) -> Path:
    """The model set folder a user names: the set itself (``.../aes_stage2``, holding ``image_proj_model.bin``), or
    a folder holding the release's sets (``infu_flux_v1.0/``, or the folder above it): its first set present, in
    the authors' order (aes_stage2, then sim_stage1). Name ``.../sim_stage1`` to load that one."""
    if source is None:
        raise CheckpointError(
            "InfiniteYou's released files are unpinned in faceid's method table, so faceid does not download them: "
            "download infu_flux_v1.0/ from https://huggingface.co/ByteDance/InfiniteYou and give its folder (or one "
            f"model set in it: {', '.join(MODEL_SETS)})"
        )
    folder = Path(source).expanduser()
    for candidate in (folder, folder / "infu_flux_v1.0"):
        if (candidate / IMAGE_PROJ_FILE).is_file():
            return candidate
        for model_set in MODEL_SETS:
            if (candidate / model_set / IMAGE_PROJ_FILE).is_file():
                return candidate / model_set
    raise CheckpointError(
        f"{folder} is not an InfiniteYou model set: it has no {IMAGE_PROJ_FILE}, and no infu_flux_v1.0/"
        f"{{{','.join(MODEL_SETS)}}}/{IMAGE_PROJ_FILE} under it. Give a folder of the release "
        "(https://huggingface.co/ByteDance/InfiniteYou): infu_flux_v1.0/, or one of its model sets"
    )


def _as_embeddings(embeddings: Any) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
    if tensor.shape[-1] != EMBEDDING_DIM or tensor.ndim not in (1, 2, 3):
        raise FaceIDError(
            f"InfiniteYou reads {EMBEDDING_DIM}-d ArcFace embeddings: (512,), (faces, 512) or (people, faces, 512), "
            f"got {tuple(tensor.shape)}"
        )
    return tensor.reshape(1, -1, EMBEDDING_DIM) if tensor.ndim < 3 else tensor


@dataclass(frozen=True)
class InfiniteYou:
    """A loaded InfiniteYou model set: the Resampler and InfuseNet, read by every call, changed by none."""

    image_proj: ImageResampler
    infusenet: FluxControlNetModel
    recognizer: IRSE50 | None = None  # facexlib's ArcFace IR-SE50, which embeds photos (None: embeddings only)
    name = "infiniteyou"  # the method's name (faceid.methods.METHODS)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        recognizer: str | Path | None = None,
    ) -> InfiniteYou:
        """Load a released model set folder (``infu_flux_v1.0/aes_stage2`` or ``.../sim_stage1``); ``recognizer``:
        facexlib's ``recognition_arcface_ir_se50.pth``, which embeds face photos (without it, calls give
        embeddings)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(
                f"InfiniteYou model set not found: {folder}; give a folder of the release's infu_flux_v1.0/ "
                f"({' or '.join(MODEL_SETS)})"
            )
        image_proj = load_image_proj(folder / IMAGE_PROJ_FILE)
        infusenet = load_infusenet(folder / INFUSENET_FOLDER, torch_dtype)
        image_proj.to(device=device, dtype=torch_dtype)
        infusenet.to(device=device)
        arcface = None if recognizer is None else load_irse50(recognizer)
        return cls(image_proj, infusenet, arcface)

    @torch.no_grad()
    def identity_tokens(self, embeddings: Any) -> torch.Tensor:
        """ArcFace embeddings -> identity tokens (people, num_queries, text width).

        ``embeddings``: (512,) for one face, (faces, 512) for several photos of one person (one identity: the
        Resampler reads them as its inputs, the authors' ``reshape([1, -1, 512])``), or (people, faces, 512). Each
        embedding is L2-normalised (facexlib's output already is; a raw one is made so). The released weights
        were trained on facexlib's ArcFace (``init_recognition_model("arcface")``, an IR-SE50 network, on the
        112x112 BGR crop aligned by antelopev2's keypoints), not on the buffalo_l ArcFace of faceid's
        ``Face.embedding``: another network's embedding is not interchangeable with it.
        """
        param = next(self.image_proj.parameters())
        tensor = _as_embeddings(embeddings).to(device=param.device, dtype=torch.float32)
        tensor = torch.nn.functional.normalize(tensor, dim=-1)
        return self.image_proj(tensor.to(param.dtype))

    def face_embedding(self, face) -> np.ndarray:
        """The 512-d embedding InfiniteYou was trained on of an analysed face: facexlib's ArcFace IR-SE50 on its
        112x112 crop aligned by the 5 keypoints (``Face.aligned``), BGR in [-1, 1], as the authors'
        ``extract_arcface_bgr_embedding``. A face analysed with that recognizer already (``FaceAnalyzer.
        with_recognizer``: a server's enrolled faces keep it under ``IRSE50_KEY``) gives its kept vector."""
        kept = getattr(face, "raw_embeddings", {}).get(IRSE50_KEY)
        if kept is not None:
            return np.asarray(kept, np.float32)
        if self.recognizer is None:
            raise FaceIDError(
                f"InfiniteYou embeds face photos with facexlib's ArcFace IR-SE50 ({IRSE50_FILE}), and none is loaded: "
                "put the file in the InfiniteYou folder (next to infu_flux_v1.0/ or in the model set folder) or in "
                "the face models folder "
                "(https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth), "
                "or give the 512-d embedding itself as the face"
            )
        return self.recognizer.embed(face.aligned)

    def controlnet(
        self,
        id_tokens: torch.Tensor,
        guidance: float = INFUSENET_GUIDANCE,
        others: Sequence[FluxControlNetModel] = (),
        blocks: tuple[int, int] | None = None,
        guidance_scale: float | None = None,
    ) -> InfuseNetCall:
        """One call's InfuseNet, and the user's FLUX ControlNets ``others`` beside it, for a stock
        ``FluxControlNetPipeline`` (see :class:`InfuseNetCall`)."""
        return InfuseNetCall(self.infusenet, id_tokens, guidance, others, blocks, guidance_scale)


# ----------------------------------------------------------------------------------------------- one step


def infusenet_residuals(
    infusenet: FluxControlNetModel,
    *,
    hidden_states: torch.Tensor,
    controlnet_cond: torch.Tensor,
    conditioning_scale: float,
    timestep: torch.Tensor,
    pooled_projections: torch.Tensor,
    img_ids: torch.Tensor,
    id_tokens: torch.Tensor,
    guidance: float = INFUSENET_GUIDANCE,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """InfuseNet's scaled residuals for the transformer's double and single blocks.

    ``timestep`` as the transformer gets it (diffusers' ``t / 1000``); ``controlnet_cond`` the packed latents of
    the control image; ``id_tokens`` (1 or batch, tokens, width) stand where a ControlNet reads the prompt, with
    zeros as their positions (``txt_ids``); ``guidance`` is InfuseNet's own (1.0 as released)."""
    batch = hidden_states.shape[0]
    if id_tokens.shape[0] not in (1, batch):
        raise FaceIDError(f"InfiniteYou: identity tokens for {id_tokens.shape[0]} images but a batch of {batch}")
    id_tokens = id_tokens.to(device=hidden_states.device, dtype=hidden_states.dtype).expand(batch, -1, -1)
    txt_ids = torch.zeros(id_tokens.shape[1], 3, device=id_tokens.device, dtype=id_tokens.dtype)
    embedded_guidance = None
    if infusenet.config.guidance_embeds:
        embedded_guidance = torch.full((batch,), float(guidance), device=hidden_states.device)
    block_samples, single_block_samples = infusenet(
        hidden_states=hidden_states,
        controlnet_cond=controlnet_cond,
        conditioning_scale=conditioning_scale,
        timestep=timestep,
        guidance=embedded_guidance,
        pooled_projections=pooled_projections,
        encoder_hidden_states=id_tokens,
        txt_ids=txt_ids,
        img_ids=img_ids,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
    )
    return block_samples, single_block_samples


@dataclass(frozen=True)
class StepOutput:
    noise_pred: torch.Tensor  # the transformer's output (flow velocity), packed
    block_samples: list[torch.Tensor]  # InfuseNet's double-block residuals (scaled)
    single_block_samples: list[torch.Tensor]  # its single-block residuals (scaled, image tokens only)


def denoise_step(
    transformer,
    infusenet: FluxControlNetModel,
    *,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    guidance: torch.Tensor | None,
    pooled_projections: torch.Tensor,
    prompt_embeds: torch.Tensor,
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
    id_tokens: torch.Tensor,
    controlnet_cond: torch.Tensor,
    conditioning_scale: float,
    infusenet_guidance: float = INFUSENET_GUIDANCE,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> StepOutput:
    """One InfiniteYou step, as the authors' ``FluxInfuseNetPipeline`` takes it: InfuseNet on the identity tokens
    and the control image, then the FLUX transformer on the prompt with InfuseNet's residuals. ``guidance`` is the
    transformer's (a (batch,) tensor, or None for a model without guidance embedding)."""
    block_samples, single_block_samples = infusenet_residuals(
        infusenet,
        hidden_states=hidden_states,
        controlnet_cond=controlnet_cond,
        conditioning_scale=conditioning_scale,
        timestep=timestep,
        pooled_projections=pooled_projections,
        img_ids=img_ids,
        id_tokens=id_tokens,
        guidance=infusenet_guidance,
        joint_attention_kwargs=joint_attention_kwargs,
    )
    noise_pred = transformer(
        hidden_states=hidden_states,
        timestep=timestep,
        guidance=guidance,
        pooled_projections=pooled_projections,
        encoder_hidden_states=prompt_embeds,
        controlnet_block_samples=block_samples,
        controlnet_single_block_samples=single_block_samples,
        txt_ids=txt_ids,
        img_ids=img_ids,
        joint_attention_kwargs=joint_attention_kwargs,
        return_dict=False,
        controlnet_blocks_repeat=False,
    )[0]
    return StepOutput(noise_pred, block_samples, single_block_samples)


def per_block(residuals: Sequence[torch.Tensor] | None, blocks: int, repeat: bool = False) -> list[torch.Tensor]:
    """A ControlNet's residual list as one residual per transformer block, by the rule the FLUX transformer maps it
    with (``FluxTransformer2DModel.forward``): block i gets ``residuals[i // ceil(blocks / n)]``, or with
    ``repeat`` (an XLabs net, ``controlnet_blocks_repeat``) ``residuals[i % n]``. Given the expanded list the
    transformer adds block i's own entry, so expanding changes nothing; expanded lists of nets of different
    depths can be summed entry by entry (diffusers' ``FluxMultiControlNetModel`` zips them unexpanded)."""
    if not residuals:
        return []
    count = len(residuals)
    interval = math.ceil(blocks / count)
    return [residuals[i % count] if repeat else residuals[i // interval] for i in range(blocks)]


def summed_per_block(
    lists: Sequence[Sequence[torch.Tensor] | None], blocks: int, repeat: bool = False
) -> list[torch.Tensor] | None:
    """Several ControlNets' residual lists, each expanded by :func:`per_block`, summed block by block in the
    order given (None when no net gives any)."""
    expanded = [per_block(residuals, blocks, repeat) for residuals in lists if residuals]
    if not expanded:
        return None
    total = list(expanded[0])
    for other in expanded[1:]:
        total = [a + b for a, b in zip(total, other, strict=True)]
    return total


class InfuseNetCall(FluxMultiControlNetModel):
    """One call's InfuseNet, and the user's FLUX ControlNets beside it, for a stock diffusers
    ``FluxControlNetPipeline``: made per call, it holds that call's identity tokens, InfuseNet guidance and the
    transformer's guidance scale; the loaded nets are shared, read-only.

    diffusers' pipeline gives its ControlNet the prompt (``encoder_hidden_states``, ``txt_ids``) and the
    transformer's ``guidance_scale``; InfuseNet reads instead the identity tokens, zeros of their count and its own
    guidance (1.0), and the rest (latents, the encoded control image, the scale with the
    ``control_guidance_start/end`` window applied, timestep, pooled text) as the pipeline computed them. The user's
    nets (``others``) read the prompt as a stock pipeline gives it, each its own control image, scale and window.
    It is a ``FluxMultiControlNetModel`` (the pipeline's class for ControlNets it did not load), so the call takes
    lists, InfuseNet's entry first: ``control_image=[kps, *images]``, ``controlnet_conditioning_scale=[scale,
    *scales]``. Put it on the call's own pipeline object (``FluxControlNetPipeline.from_pipe(base, controlnet=call,
    scheduler=fresh)``); the transformer gets the residuals with ``controlnet_blocks_repeat=False`` (InfuseNet has
    no input hint block, so the pipeline VAE-encodes every control image: the user's nets must be of that kind).

    The nets may differ in depth: with ``others``, each net's residuals are expanded to one per transformer block
    (``blocks``: the transformer's double and single block counts) by the transformer's own rule and summed
    (:func:`summed_per_block`), which is exactly what each net's residuals alone would add. Without ``others`` the
    residuals are InfuseNet's own lists.
    """

    def __init__(
        self,
        infusenet: FluxControlNetModel,
        id_tokens: torch.Tensor,
        guidance: float = INFUSENET_GUIDANCE,
        others: Sequence[FluxControlNetModel] = (),
        blocks: tuple[int, int] | None = None,
        guidance_scale: float | None = None,
    ):
        super().__init__([infusenet, *others])
        if others:
            check_beside_infusenet(others)
            if blocks is None:
                raise FaceIDError(
                    "InfuseNetCall with other ControlNets needs blocks=(double, single) of the transformer"
                )
        self.id_tokens = id_tokens
        self.guidance = float(guidance)
        self.blocks = blocks
        self.guidance_scale = guidance_scale  # the transformer's, for a user's net that embeds guidance

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        controlnet_cond: Sequence[torch.Tensor],
        controlnet_mode: Any = None,
        conditioning_scale: Sequence[float] = (1.0,),
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        # InfuseNet does not read encoder_hidden_states, txt_ids, guidance and controlnet_mode (the prompt's and the
        # transformer's); the user's nets do.
        nets = len(self.nets)
        if len(controlnet_cond) != nets or len(conditioning_scale) != nets:
            raise FaceIDError(
                f"InfiniteYou with {nets - 1} ControlNet(s) of one's own takes {nets} control images and scales "
                f"(InfuseNet's first), got {len(controlnet_cond)} and {len(conditioning_scale)}: pass "
                "control_image=[kps, *images], controlnet_conditioning_scale=[scale, *scales]"
            )
        infused = infusenet_residuals(
            self.nets[0],
            hidden_states=hidden_states,
            controlnet_cond=controlnet_cond[0],
            conditioning_scale=conditioning_scale[0],
            timestep=timestep,
            pooled_projections=pooled_projections,
            img_ids=img_ids,
            id_tokens=self.id_tokens,
            guidance=self.guidance,
            joint_attention_kwargs=joint_attention_kwargs,
        )
        if nets == 1:
            return infused
        outputs = [infused]
        modes = controlnet_mode if isinstance(controlnet_mode, (list, tuple)) else [controlnet_mode] * nets
        for net, image, scale, mode in zip(
            self.nets[1:], controlnet_cond[1:], conditioning_scale[1:], modes[1:], strict=True
        ):
            net_guidance = None
            if net.config.guidance_embeds:
                value = self.guidance_scale if self.guidance_scale is not None else guidance
                net_guidance = torch.as_tensor(value, device=hidden_states.device, dtype=torch.float32).reshape(-1)
                net_guidance = net_guidance.expand(hidden_states.shape[0])
            outputs.append(
                net(
                    hidden_states=hidden_states,
                    controlnet_cond=image,
                    controlnet_mode=None if mode is None or not net.union else mode[:, None],
                    conditioning_scale=scale,
                    timestep=timestep,
                    guidance=net_guidance,
                    pooled_projections=pooled_projections,
                    encoder_hidden_states=encoder_hidden_states,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    joint_attention_kwargs=joint_attention_kwargs,
                    return_dict=False,
                )
            )
        double, single = self.blocks
        return (
            summed_per_block([out[0] for out in outputs], double),
            summed_per_block([out[1] for out in outputs], single),
        )


def check_beside_infusenet(nets: Sequence[Any]) -> None:
    """A user's FLUX ControlNet runs beside InfuseNet only if, like InfuseNet, it reads the VAE-encoded control
    image (no input hint block: an InstantX-style net, not an XLabs one): ``modes.check_flux_controlnet_layouts``."""
    from ..modes import check_flux_controlnet_layouts, flux_controlnet_layout

    check_flux_controlnet_layouts([flux_controlnet_layout(net.config) for net in nets], beside_infusenet=True)


# ----------------------------------------------------------------------------------------------- control image


def fit_photo(photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The authors' ``resize_and_pad_image``: the photo scaled to the frame's shorter side (its width when the
    frame is portrait or square, else its height), aspect kept, centred on white; the overflow of the other side
    is cut off. (Neither of ``faceid.control``'s fits: "pad" fits inside, "crop" covers.)"""
    width, height = size
    if width <= height:
        new_size = (width, int(width * photo.height / photo.width))
    else:
        new_size = (int(height * photo.width / photo.height), height)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(photo.resize(new_size, Image.LANCZOS), ((width - new_size[0]) // 2, (height - new_size[1]) // 2))
    return canvas


def control_image(size: tuple[int, int], landmarks: np.ndarray | None = None) -> Image.Image:
    """InfuseNet's control image of ``size`` = (width, height): the face's 5 landmarks (in that frame: found on
    :func:`fit_photo` of the pose photo) drawn as InstantID draws them, or all black without a pose photo."""
    width, height = size
    if landmarks is None:
        return Image.fromarray(np.zeros((height, width, 3), np.uint8))
    return draw_kps((width, height), np.asarray(landmarks, np.float64))
