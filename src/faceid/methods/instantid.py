"""InstantID (SDXL): IdentityNet, a ControlNet on the face keypoints whose context is the identity tokens, and
its IP-Adapter (a Resampler over the antelopev2 embedding) in the UNet's cross-attention.

The released files (``InstantX/InstantID``) are ``ip-adapter.bin``, ``{"image_proj": <Resampler>,
"ip_adapter": {"<i>.to_k_ip.weight", "<i>.to_v_ip.weight"}}`` with ``i`` the cross-attention processors in
``unet.attn_processors`` order, and ``ControlNetModel/``, a diffusers ``ControlNetModel`` (IdentityNet). The
Resampler is IP-Adapter-Plus's (``faceid.projection.ImageResampler``) whose input is the 512-d face embedding
instead of CLIP features; its layout is read as ``faceid.references`` reads IP-Adapter-Plus's, every size off the
tensors. Its ``to_k_ip``/``to_v_ip`` become one more ``DecoupledBranch`` (named ``instantid``) of faceid's
decoupled cross-attention, next to a FaceID adapter's branches if one is installed.

One denoiser step, as the authors' pipeline runs it (``pipeline_stable_diffusion_xl_instantid.py``):

* identity tokens = ``Resampler(embedding.reshape(1, -1, 512))`` from the *raw* (not L2-normalised) antelopev2
  embedding(s); several embeddings of one person are one identity whose Resampler reads N input tokens; the
  unconditional tokens are ``Resampler(zeros)`` of the same shape, not zeros;
* IdentityNet reads the identity tokens as its ``encoder_hidden_states`` (not the text), the keypoint image
  (``faceid.control.make_control_image("kps", ...)`` draws it as the authors' ``draw_kps`` does) as its condition,
  with the ControlNet conditioning scale;
* the UNet reads the text as its context and the identity tokens through the decoupled branch at the IP scale
  (``h = attn(q, text) + scale * attn(q, tokens)`` before ``to_out``), plus IdentityNet's residuals.

Everything of a call travels with the call: the tokens and IP scale as a ``TokenGroup`` in
``cross_attention_kwargs["ip_hidden_states"]``, the tokens as IdentityNet's context in an ``IdentityNetControl``
made for the call (a diffusers ``MultiControlNetModel``, so a stock ``StableDiffusionXLControlNetPipeline``, or
any of its img2img/inpainting siblings, runs it; other ControlNets can ride along and read the text as usual).
The loaded modules are only read during calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapter import load_strict
from ..attention import DecoupledBranch, FaceIDAttnProcessor, TokenGroup
from ..checkpoints import check_loading_report, load_state_dict, loading_error
from ..errors import CheckpointError, FaceIDError
from ..modes import check_controlnet
from ..references import ReferenceSpec

try:  # the base class only; diffusers is a hard dependency anyway
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
except ImportError:  # pragma: no cover
    MultiControlNetModel = nn.Module  # type: ignore[misc,assignment]

__all__ = ["IP_ADAPTER_FILE", "IDENTITYNET_FOLDER", "IdentityNetControl", "IdentityTokens", "InstantID", "StepOutput"]

IP_ADAPTER_FILE = "ip-adapter.bin"  # the released names, in InstantX/InstantID
IDENTITYNET_FOLDER = "ControlNetModel"
BRANCH = "instantid"


@dataclass(frozen=True)
class IdentityTokens:
    """One identity's tokens: ``cond`` = Resampler(embeddings), ``uncond`` = Resampler(zeros of the same shape),
    each ``(1, tokens, cross_attention_dim)``."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def batch(self, images: int = 1, classifier_free_guidance: bool = True) -> torch.Tensor:
        """The tokens of a UNet batch of ``images`` images in diffusers' order: ``[uncond] * images + [cond] *
        images`` with classifier-free guidance, ``[cond] * images`` without."""
        rows = [self.uncond] * images + [self.cond] * images if classifier_free_guidance else [self.cond] * images
        return torch.cat(rows)


@dataclass(frozen=True)
class StepOutput:
    """One denoiser step: the UNet's noise prediction and IdentityNet's residuals (already scaled)."""

    noise_pred: torch.Tensor
    down_residuals: tuple[torch.Tensor, ...]
    mid_residual: torch.Tensor


class IdentityNetControl(MultiControlNetModel):
    """The ControlNets of one call: IdentityNet first, reading ``context`` (the call's identity tokens, one row per
    sample of the UNet batch) in place of the text, then any ``others``, reading the text as usual.

    Made per call and given to the call's diffusers ControlNet pipeline as its ``controlnet``: being a
    ``MultiControlNetModel``, the pipeline takes ``image``, ``controlnet_conditioning_scale`` and
    ``control_guidance_start/end`` as lists, one entry per ControlNet, IdentityNet's (the keypoint image) first.
    It holds only references to the shared ControlNets and the call's tokens.
    """

    def __init__(self, identitynet: nn.Module, context: torch.Tensor, others: Sequence[nn.Module] = ()):
        super().__init__([identitynet, *others])
        self.context = context  # a plain attribute (not a buffer): the call's, never saved or moved

    def _identity_context(self, sample: torch.Tensor) -> torch.Tensor:
        rows, batch = self.context.shape[0], sample.shape[0]
        if rows == batch:
            return self.context
        if rows == 2 * batch:  # guess mode with CFG: diffusers runs the ControlNets on the conditional half only
            return self.context[batch:]
        raise FaceIDError(
            f"IdentityNet's identity tokens have {rows} rows but the ControlNet batch is {batch}: make them with "
            "IdentityTokens.batch(images, classifier_free_guidance) for this call"
        )

    def forward(  # the signature of MultiControlNetModel.forward, which the diffusers pipelines call
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise FaceIDError(
                f"this call has {len(self.nets)} ControlNets (IdentityNet first) but {len(controlnet_cond)} control "
                f"images and {len(conditioning_scale)} scales: give one of each per ControlNet"
            )
        identity = self._identity_context(sample).to(sample.dtype)
        down, mid = None, None
        for index, (net, image, scale) in enumerate(zip(self.nets, controlnet_cond, conditioning_scale, strict=True)):
            net_down, net_mid = net(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=identity if index == 0 else encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            if down is None:
                down, mid = list(net_down), net_mid
            else:
                down = [a + b for a, b in zip(down, net_down, strict=True)]
                mid = mid + net_mid
        return down, mid


class InstantID:
    """InstantID loaded next to an SDXL UNet: the Resampler, IdentityNet and the ``instantid`` branch of the UNet's
    decoupled cross-attention. Create it with ``InstantID.load``; ``remove()`` takes the branch out again."""

    def __init__(self, unet: nn.Module, spec: ReferenceSpec, resampler: nn.Module, identitynet: nn.Module, name: str):
        self.unet = unet
        self.spec = spec
        self.resampler = resampler
        self.identitynet = identitynet
        self.name = name
        self.branches: dict[str, DecoupledBranch] = {}  # module path -> the branch in its processor
        self._replaced: dict[str, Any] = {}  # processor name -> the processor it replaced (none was faceid's)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        unet: nn.Module,
        ip_adapter: str | os.PathLike | dict,
        identitynet: str | os.PathLike | nn.Module,
        *,
        name: str = BRANCH,
        label: str | None = None,
    ) -> InstantID:
        """Load InstantID's released files next to ``unet`` (an SDXL ``UNet2DConditionModel``).

        ``ip_adapter``: ``ip-adapter.bin`` (or its state dict); ``identitynet``: the ``ControlNetModel`` folder
        (or a loaded diffusers ``ControlNetModel``). Both are checked strictly: a missing, extra or misshaped
        tensor is a ``CheckpointError`` naming it. The branch ``name`` is added to the processors of every
        cross-attention layer (a FaceID adapter's processors keep theirs; other layers get a
        ``FaceIDAttnProcessor``). Everything goes to the UNet's device and dtype.
        """
        label = label or (Path(ip_adapter).name if isinstance(ip_adapter, (str, os.PathLike)) else IP_ADAPTER_FILE)
        state = load_state_dict(ip_adapter) if isinstance(ip_adapter, (str, os.PathLike)) else ip_adapter
        spec = ReferenceSpec.from_state_dict(state, label, "InstantID's ip-adapter.bin (InstantX/InstantID)")
        if spec.resampler is None:
            raise CheckpointError(
                f"{label} is not InstantID's ip-adapter.bin: its 'image_proj' is a plain IP-Adapter projection, not "
                "the Resampler InstantID reads the face embedding with"
            )
        unet_cad = unet.config.cross_attention_dim
        if spec.cross_attention_dim != unet_cad:
            raise CheckpointError(
                f"{label} makes {spec.cross_attention_dim}-wide tokens but this UNet's cross-attention width is "
                f"{unet_cad}: InstantID is made for SDXL (2048)"
            )
        param = next(unet.parameters())
        resampler = spec.projection()
        load_strict(resampler, state["image_proj"], f"{label} image_proj")
        resampler = resampler.to(param.device, param.dtype).eval().requires_grad_(False)
        identitynet = _load_identitynet(identitynet, param.dtype)
        check_controlnet(identitynet, unet, "SDXL", "IdentityNet")
        identitynet = identitynet.to(param.device, param.dtype).eval().requires_grad_(False)
        adapter = cls(unet, spec, resampler, identitynet, name)
        adapter._install(state["ip_adapter"], label)
        return adapter

    def _install(self, weights: dict[str, torch.Tensor], label: str) -> None:
        processors = dict(self.unet.attn_processors)
        cross = {
            index: key
            for index, key in enumerate(processors)
            if self.unet.get_submodule(key.removesuffix(".processor")).is_cross_attention
        }
        extra = sorted(set(self.spec.ip_layers) - set(cross))
        if extra:
            raise CheckpointError(
                f"{label}: unexpected key 'ip_adapter.{extra[0]}.to_k_ip.weight': processor {extra[0]} of this UNet "
                f"is not a cross-attention layer (those are {sorted(cross)}); is the file for this base model?"
            )
        param = next(self.unet.parameters())
        for index, key in cross.items():
            wanted = {f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight"}
            missing = sorted(wanted - set(weights))
            if missing:
                raise CheckpointError(
                    f"{label}: missing key 'ip_adapter.{missing[0]}' (the layer of cross-attention processor "
                    f"{index}); is the file complete and for this base model?"
                )
            path = key.removesuffix(".processor")
            branch = DecoupledBranch.for_layer(self.unet.get_submodule(path))
            part = {k.removeprefix(f"{index}."): weights[k] for k in sorted(wanted)}
            load_strict(branch, part, f"{label} ip_adapter.{index}")
            self.branches[path] = branch.to(param.device, param.dtype).requires_grad_(False)
        for path, branch in self.branches.items():
            current = processors[f"{path}.processor"]
            if not isinstance(current, FaceIDAttnProcessor):
                self._replaced[f"{path}.processor"] = current
                processors[f"{path}.processor"] = FaceIDAttnProcessor(self.name, branch)
            elif self.name in current.branches:
                raise FaceIDError(
                    f"an adapter named {self.name!r} is already installed on {path}: remove it first or load "
                    "InstantID under another name"
                )
        for path, branch in self.branches.items():  # a FaceID adapter's processors get the branch next to theirs
            current = processors[f"{path}.processor"]
            if self.name not in current.branches:
                current.branches[self.name] = branch
        self.unet.set_attn_processor(processors)

    def remove(self) -> None:
        """Take the ``instantid`` branch out of the UNet, putting back the processors it replaced."""
        processors = dict(self.unet.attn_processors)
        for key, processor in processors.items():
            if key in self._replaced:
                processors[key] = self._replaced[key]
            elif isinstance(processor, FaceIDAttnProcessor) and self.name in processor.branches:
                del processor.branches[self.name]
        self.unet.set_attn_processor(processors)
        self.branches, self._replaced = {}, {}

    # ------------------------------------------------------------------ per call
    @property
    def embedding_dim(self) -> int:
        """The width of the face embedding the Resampler reads (512: antelopev2's ArcFace)."""
        return self.spec.clip_dim

    @torch.no_grad()
    def identity_tokens(self, embeddings: np.ndarray | torch.Tensor | Sequence) -> IdentityTokens:
        """The identity tokens of one person from the *raw* antelopev2 embedding(s) (insightface's
        ``face.embedding``, not ``normed_embedding``): ``(512,)`` for one photo, ``(N, 512)`` for N photos of the
        person, which the Resampler reads together as N input tokens (the authors' ``reshape([1, -1, 512])``)."""
        param = next(self.resampler.parameters())
        embeds = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
        if embeds.ndim not in (1, 2) or embeds.shape[-1] != self.embedding_dim or embeds.numel() == 0:
            raise FaceIDError(
                f"InstantID reads {self.embedding_dim}-d face embeddings (antelopev2), one or one per photo of the "
                f"person: got shape {tuple(embeds.shape)}"
            )
        embeds = embeds.reshape(1, -1, self.embedding_dim).to(param.device, param.dtype)
        return IdentityTokens(cond=self.resampler(embeds), uncond=self.resampler(torch.zeros_like(embeds)))

    def token_group(self, context: torch.Tensor, scale: float | Sequence[float] | torch.Tensor) -> TokenGroup:
        """The UNet's side of a call: ``context`` (one row per sample, ``IdentityTokens.batch``) read through the
        ``instantid`` branch at the IP scale, for ``cross_attention_kwargs["ip_hidden_states"]``."""
        return TokenGroup(context, self.name, scale)

    def control(self, context: torch.Tensor, others: Sequence[nn.Module] = ()) -> IdentityNetControl:
        """IdentityNet's side of a call: the ControlNet the call's pipeline runs, with ``context`` (the same rows
        as the UNet's) as IdentityNet's context, and ``others`` after it."""
        return IdentityNetControl(self.identitynet, context, others)

    @torch.no_grad()
    def step(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        text_context: torch.Tensor,
        identity_context: torch.Tensor,
        control_image: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        *,
        ip_scale: float,
        conditioning_scale: float,
    ) -> StepOutput:
        """One denoiser step as the authors' pipeline runs it, on a UNet batch (``[uncond, cond]`` rows with
        CFG, the conditional rows alone without): IdentityNet on ``control_image`` (the prepared keypoint image in
        [0, 1], one row per sample) reading ``identity_context``, then the UNet reading ``text_context`` and the
        identity through the branch, plus IdentityNet's residuals."""
        down, mid = self.control(identity_context)(
            sample,
            timestep,
            encoder_hidden_states=text_context,
            controlnet_cond=[control_image],
            conditioning_scale=[conditioning_scale],
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        noise_pred = self.unet(
            sample,
            timestep,
            encoder_hidden_states=text_context,
            cross_attention_kwargs={"ip_hidden_states": [self.token_group(identity_context, ip_scale)]},
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        return StepOutput(noise_pred, tuple(down), mid)


def _load_identitynet(source: str | os.PathLike | nn.Module, dtype: torch.dtype) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    from diffusers import ControlNetModel

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"IdentityNet not found: {folder} has no config.json; download the {IDENTITYNET_FOLDER}/ folder of "
            "InstantX/InstantID (config.json and diffusion_pytorch_model.safetensors)"
        )
    what = f"IdentityNet in {folder}"
    advice = f"is it InstantID's {IDENTITYNET_FOLDER}/ folder, complete and not corrupted?"
    try:
        # diffusers fills a missing tensor with a fresh random one and skips an unknown one, with a log line only:
        # its loading report is what makes the load strict.
        model, report = ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, output_loading_info=True)
    except Exception as exc:
        raise loading_error(exc, what, advice) from exc
    check_loading_report(report, what, advice)
    return model
