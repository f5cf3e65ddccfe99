"""PuLID: the ID encoder (antelopev2 embedding + EVA02-CLIP-L features -> identity tokens) and its attention
pieces, in the SDXL UNet (v1.1) and between the FLUX.1 transformer's blocks (v0.9.1).

Numerically the authors' code (github.com/ToTheBeginning/PuLID, commit 1aa2fc7d): ``pulid/encoders_transformer.py``
(IDFormer, PerceiverAttentionCA), ``pulid/attention_processor.py`` (IDAttnProcessor2_0), ``pulid/pipeline_v1_1.py``
and ``pulid/pipeline_flux.py`` with ``flux/model.py`` (where the CA modules act). What differs is the design:

* **Sizes come from the released tensors.** ``IDFormerConfig.from_state_dict`` reads every width, the depth and
  the token counts off the file; only the head widths, which no shape shows, are the released constants
  (64 in the IDFormer, 128 in the FLUX cross-attention).
* **Per-call values are arguments.** The authors switch the module globals ``NUM_ZERO``, ``ORTHO`` and
  ``ORTHO_v2`` (and set ``id_weight`` per forward); here a call carries them in its own object: ``PuLIDTokens``
  in ``cross_attention_kwargs["ip_hidden_states"]`` (SDXL) and ``PuLIDIdentity`` in
  ``joint_attention_kwargs["pulid"]`` (FLUX). Modules loaded once are never changed by a call, so several threads
  can share them.
* **diffusers' models, not forks.** SDXL: ``PuLIDAttnProcessor`` is set on the UNet's cross-attention layers.
  FLUX: diffusers' ``FluxTransformer2DModel`` is used as it is; ``PuLIDFlux.attach`` wraps its blocks
  (``PuLIDFluxBlock``), each wrapper running the block and then adding its cross-attention term.

The encoder's inputs are a ``PuLIDFace`` (the antelopev2 embedding and the EVA tower's outputs), which
``faceid.methods.pulid_face.PuLIDFaceEncoder`` makes from a photo. ``PuLID`` (below) is v1.1 loaded for
generation beside FaceID (``ModelSet.load_method("pulid", FOLDER)``): a call's ``PuLIDCall`` reaches each
cross-attention layer through FaceID's processor there, so nothing is put on the UNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import CallAttention
from ..errors import CheckpointError, FaceIDError
from ..projection import PerceiverAttention, feed_forward
from .pulid_face import EVA_CLIP_FILE, PARSING_FILE, PuLIDFace, PuLIDFaceEncoder, _count, _load_exactly, _tensor

IDFORMER_DIM_HEAD = 64
"""The IDFormer's head width: released ``heads = inner width / 64`` (no tensor shape shows it)."""

CA_DIM_HEAD = 128
"""PuLID-FLUX's cross-attention head width (``PerceiverAttentionCA(dim_head=128)``)."""

ORTHO_MODES = ("off", "v1", "v2")
"""How the identity attention joins the text attention in SDXL: ``off`` adds it (the authors' module default),
``v1`` adds only its part orthogonal to the text attention (``ORTHO``), ``v2`` adds the orthogonal part plus the
parallel part weighed by how much the queries look at the leading identity tokens (``ORTHO_v2``, the app's
default with ``num_zero`` 20)."""

ORTHO_V2_LEADING_TOKENS = 5
"""ORTHO_v2 weighs by the attention on the first 5 identity tokens (the authors' literal ``[:, :, :5]``)."""

FLUX_DOUBLE_INTERVAL = 2
FLUX_SINGLE_INTERVAL = 4
"""PuLID-FLUX acts after double block i when ``i % 2 == 0`` and after single block i when ``i % 4 == 0``."""


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a released PuLID ``.safetensors`` file (``pulid_v1.1``, ``pulid_flux_v0.9.1``), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PuLID checkpoint not found: {path}")
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as exc:  # truncated, not safetensors at all
        raise CheckpointError(
            f"cannot read PuLID checkpoint {path} ({type(exc).__name__}: {str(exc)[:300]}); is it a released "
            "pulid_*.safetensors file, complete and not corrupted?"
        ) from exc


def _part(state: dict[str, torch.Tensor], prefix: str, label: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix taken off."""
    part = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(prefix + ".")}
    if not part:
        raise CheckpointError(f"{label} has no '{prefix}.*' tensors: it is not the PuLID file this needs")
    return part


# ----------------------------------------------------------------------------------------------------------------
# The ID encoder
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IDFormerConfig:
    """The IDFormer's sizes, read off a file (released, v1.1 and FLUX alike: dim 1024, depth 10, heads 16,
    5 id tokens, 32 queries, output 2048; EVA02-CLIP-L width 1024, id condition 512 + 768 = 1280)."""

    dim: int
    depth: int
    heads: int
    num_id_token: int
    num_queries: int
    output_dim: int
    ff_mult: int
    eva_width: int  # width of the EVA tower's hidden states
    mapping_width: int  # hidden width of the mapping MLPs (the authors' literal 1024, = the EVA width)
    id_cond_dim: int  # antelopev2 (512) + EVA projection width
    scales: int = 5  # EVA hidden states read, one mapping each; depth // scales layers per scale
    dim_head: int = IDFORMER_DIM_HEAD

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], label: str = "the PuLID ID encoder") -> IDFormerConfig:
        latents = _tensor(state, "latents", label)
        dim = latents.shape[-1]
        first = _tensor(state, "mapping_0.0.weight", label)
        id_in = _tensor(state, "id_embedding_mapping.0.weight", label)
        depth = _count(state, "layers")
        scales = _count(state, "mapping_", separator="")
        if depth == 0 or scales == 0 or depth % scales:
            raise CheckpointError(f"{label}: {depth} layers over {scales} EVA scales is not an IDFormer layout")
        return cls(
            dim=dim,
            depth=depth,
            heads=_tensor(state, "layers.0.0.to_q.weight", label).shape[0] // IDFORMER_DIM_HEAD,
            num_id_token=_tensor(state, "id_embedding_mapping.6.weight", label).shape[0] // dim,
            num_queries=latents.shape[1],
            output_dim=_tensor(state, "proj_out", label).shape[1],
            ff_mult=_tensor(state, "layers.0.1.1.weight", label).shape[0] // dim,
            eva_width=first.shape[1],
            mapping_width=first.shape[0],
            id_cond_dim=id_in.shape[1],
            scales=scales,
        )


def _mapping(in_dim: int, width: int, out_dim: int) -> nn.Sequential:
    """The IDFormer's MLP (keys 0, 1, 3, 4, 6): Linear, LayerNorm, LeakyReLU, twice, then Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, width),
        nn.LayerNorm(width),
        nn.LeakyReLU(),
        nn.Linear(width, width),
        nn.LayerNorm(width),
        nn.LeakyReLU(),
        nn.Linear(width, out_dim),
    )


class IDFormer(nn.Module):
    """PuLID's ID encoder: ``num_queries`` learned queries and the identity tokens read the EVA features.

    The id condition (antelopev2 embedding + normalised EVA projection) becomes ``num_id_token`` tokens that join
    the queries as latents and lead every context; the EVA hidden states enter one scale at a time (``mapping_i``,
    ``depth / scales`` perceiver layers each). The output is the queries' part times ``proj_out``. The perceiver
    layers are faceid's ``PerceiverAttention`` (the same maths as the authors'); keys are the released ones.
    """

    def __init__(self, config: IDFormerConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, dim) * dim**-0.5)
        self.proj_out = nn.Parameter(torch.randn(dim, config.output_dim) * dim**-0.5)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, config.dim_head, config.heads), feed_forward(dim, config.ff_mult)])
            for _ in range(config.depth)
        )
        for i in range(config.scales):
            self.add_module(f"mapping_{i}", _mapping(config.eva_width, config.mapping_width, dim))
        self.id_embedding_mapping = _mapping(config.id_cond_dim, config.mapping_width, dim * config.num_id_token)

    def forward(self, id_cond: torch.Tensor, eva_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """``id_cond`` (batch, id_cond_dim), or (batch, images, id_cond_dim) for several photos of one person;
        ``eva_hidden`` the EVA hidden states, one per scale, (batch, images * tokens, eva_width) -> identity tokens
        (batch, num_queries, output_dim)."""
        config = self.config
        if len(eva_hidden) != config.scales:
            raise FaceIDError(f"the ID encoder reads {config.scales} EVA hidden states, got {len(eva_hidden)}")
        images = id_cond.shape[1] if id_cond.ndim == 3 else 1
        id_tokens = self.id_embedding_mapping(id_cond).reshape(-1, config.num_id_token * images, config.dim)
        latents = torch.cat((self.latents.expand(id_tokens.shape[0], -1, -1), id_tokens), dim=1)
        per_scale = config.depth // config.scales
        for i, hidden in enumerate(eva_hidden):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(hidden)), dim=1)
            for attention, ff in self.layers[i * per_scale : (i + 1) * per_scale]:
                latents = attention(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : config.num_queries] @ self.proj_out


def id_condition(antelopev2: torch.Tensor, eva_projection: torch.Tensor) -> torch.Tensor:
    """The encoder's id condition (1, 512 + E): the raw antelopev2 embedding beside the L2-normalised EVA
    projection (the antelopev2 embedding stays as insightface gives it)."""
    antelopev2 = antelopev2.reshape(1, -1) if antelopev2.ndim == 1 else antelopev2
    eva = eva_projection / torch.norm(eva_projection, 2, 1, True)
    return torch.cat([antelopev2.to(eva.dtype), eva], dim=-1)


def encode_identity(encoder: IDFormer, faces: Sequence[PuLIDFace]) -> tuple[torch.Tensor, torch.Tensor]:
    """One person's identity tokens and the "no identity" tokens: ``(id_embedding, uncond_id_embedding)``.

    Several photos of the person (v1.1) are one identity: their conditions stack along a new dimension and their
    EVA hidden states are concatenated along the tokens, so the encoder reads all of them at once. The uncond
    tokens are the encoder's output for zeros shaped like the first photo's inputs (not zeros).
    """
    if not faces:
        raise FaceIDError("PuLID needs at least one face")
    conditions = [id_condition(face.antelopev2, face.eva_projection) for face in faces]
    scales = len(faces[0].eva_hidden)
    if len(faces) == 1:
        id_cond, hidden = conditions[0], list(faces[0].eva_hidden)
    else:
        id_cond = torch.stack(conditions, dim=1)
        hidden = [torch.cat([face.eva_hidden[j] for face in faces], dim=1) for j in range(scales)]
    uncond = encoder(torch.zeros_like(conditions[0]), [torch.zeros_like(h) for h in faces[0].eva_hidden])
    return encoder(id_cond, hidden), uncond


# ----------------------------------------------------------------------------------------------------------------
# SDXL (v1.1): the identity in the UNet's cross-attention
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PuLIDTokens:
    """One call's PuLID identity for the SDXL UNet: ``cross_attention_kwargs={"ip_hidden_states": PuLIDTokens(...)}``.

    ``embedding`` (batch or 1, tokens, dim): the encoder's tokens (``encode_identity``), one row per sample of the
    UNet batch, e.g. [identity, uncond identity] for a CFG batch. ``scale``: the id_scale, a number or one per
    sample. ``num_zero``: zero tokens appended to the identity tokens (the authors' ``NUM_ZERO``: they take part
    of the attention away from the identity). ``ortho``: one of ``ORTHO_MODES``. The key ``ip_hidden_states`` is
    one diffusers lets through to every processor quietly; the self-attention processors ignore it.
    """

    embedding: torch.Tensor
    scale: float | Sequence[float] | torch.Tensor = 1.0
    num_zero: int = 0
    ortho: str = "off"

    def __post_init__(self) -> None:
        if self.ortho not in ORTHO_MODES:
            raise FaceIDError(f"PuLID ortho must be one of {', '.join(ORTHO_MODES)}, got {self.ortho!r}")
        if self.num_zero < 0:
            raise FaceIDError(f"PuLID num_zero is a count of zero tokens (>= 0), got {self.num_zero}")
        if self.embedding.ndim != 3:
            raise FaceIDError(f"PuLID identity tokens are (batch, tokens, dim), got {tuple(self.embedding.shape)}")

    def scale_for(self, batch: int, like: torch.Tensor) -> float | torch.Tensor:
        """The scale as a number, or (batch, 1, 1) in ``like``'s dtype and device."""
        if isinstance(self.scale, (int, float)):
            return float(self.scale)
        value = torch.as_tensor(self.scale, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)
        if value.shape[0] not in (1, batch):
            raise FaceIDError(f"the PuLID id_scale has {value.shape[0]} values but the UNet batch is {batch}")
        return value


class PuLIDAttnProcessor(nn.Module):
    """A cross-attention processor with PuLID's identity branch (the authors' ``IDAttnProcessor2_0``).

    ``h = attention(q, text)``, ``h_id = attention(q, id_to_k(id ; zeros), id_to_v(id ; zeros))``, then
    ``h + scale * h_id`` (``off``), ``h + scale * (h_id - proj_h(h_id))`` (``v1``) or
    ``h + scale * (h_id + (a - 1) proj_h(h_id))`` (``v2``), before ``to_out``; ``proj_h`` projects on ``h`` over
    the query positions (per channel) and ``a`` is the mean over heads of the softmax of the unscaled ``q k_id``
    scores, summed over the first ``ORTHO_V2_LEADING_TOKENS`` identity tokens. Without ``ip_hidden_states`` it is
    plain SDPA attention. It keeps nothing of a call.

    Why its own processor rather than a branch kind of ``faceid.attention.FaceIDAttnProcessor``: that processor
    adds weighed groups (``h + sum_g w_g * mask_g * h_g``, with windows and "weight 0 is bit-exact" rules) and
    every rule there assumes the branches add. PuLID's ortho modes are not additions: each projects the identity
    attention on the text attention over the whole query sequence, and v2 also needs the identity keys' raw
    scores, so the group machinery would need a second, non-additive path threaded through it; the zero tokens
    change the keys. The per-call contract is the same: everything of a call comes in ``ip_hidden_states`` (the
    ``PuLIDTokens``), the processor is read-only, and the released key names (``id_to_k``, ``id_to_v``) load
    directly.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: PuLIDTokens | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        if ip_hidden_states is not None:
            hidden_states = self._add_identity(hidden_states, query, heads, ip_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _add_identity(self, hidden_states: torch.Tensor, query: torch.Tensor, heads, tokens: PuLIDTokens):
        batch_size = hidden_states.shape[0]
        embedding = tokens.embedding
        if embedding.shape[0] not in (1, batch_size):
            raise FaceIDError(
                f"PuLID identity tokens have batch {embedding.shape[0]} but the UNet batch is {batch_size}"
            )
        embedding = embedding.expand(batch_size, -1, -1)
        if tokens.num_zero:
            zeros = embedding.new_zeros(batch_size, tokens.num_zero, embedding.shape[-1])
            embedding = torch.cat((embedding, zeros), dim=1)
        id_key = heads(self.id_to_k(embedding).to(query.dtype))
        id_value = heads(self.id_to_v(embedding).to(query.dtype))
        id_states = F.scaled_dot_product_attention(query, id_key, id_value)
        id_states = id_states.transpose(1, 2).reshape(batch_size, -1, id_states.shape[1] * id_states.shape[-1])
        id_states = id_states.to(query.dtype)
        scale = tokens.scale_for(batch_size, hidden_states)
        if tokens.ortho == "off":
            return hidden_states + scale * id_states
        # The orthogonal modes in float32 (as the authors): the projection sums over every query position.
        dtype = hidden_states.dtype
        text, ident = hidden_states.float(), id_states.float()
        projection = (text * ident).sum(dim=-2, keepdim=True) / (text * text).sum(dim=-2, keepdim=True) * text
        if tokens.ortho == "v1":
            added = ident - projection
        else:
            scores = (query @ id_key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
            leading = scores[:, :, :ORTHO_V2_LEADING_TOKENS].sum(dim=-1, keepdim=True)
            added = ident + (leading - 1) * projection
        scale = scale if isinstance(scale, float) else scale.float()
        return (text + scale * added).to(dtype)


def cross_attention_names(unet: nn.Module) -> list[tuple[int, str]]:
    """(position in ``unet.attn_processors``, processor name) of every cross-attention layer: the released
    files number their ``id_adapter_attn_layers`` by that position (self-attention layers have none)."""
    return [(i, name) for i, name in enumerate(unet.attn_processors) if not name.endswith("attn1.processor")]


class PuLIDSDXL(nn.Module):
    """PuLID v1.1 for an SDXL UNet: the ID encoder (``id_adapter``) and the cross-attention processors
    (``id_adapter_attn_layers``, by position in ``unet.attn_processors``): the released file's two groups.

    ``PuLIDSDXL.from_file("pulid_v1.1.safetensors", unet)`` reads and checks the file; ``install(unet)`` puts the
    processors on the UNet's cross-attention layers (once: the UNet is then read-only for calls). A call then
    passes ``cross_attention_kwargs={"ip_hidden_states": PuLIDTokens(tokens, scale, num_zero, ortho)}``; a UNet
    call without it is the base model.
    """

    def __init__(self, config: IDFormerConfig, layers: dict[int, tuple[str, int, int]]):
        super().__init__()
        self.id_adapter = IDFormer(config)
        self.processor_names = {index: name for index, (name, _, _) in layers.items()}
        self.id_adapter_attn_layers = nn.ModuleDict(
            {str(index): PuLIDAttnProcessor(hidden, cross) for index, (_, hidden, cross) in layers.items()}
        )

    @classmethod
    def from_file(cls, path: str | Path, unet: nn.Module) -> PuLIDSDXL:
        label = Path(path).name
        return cls.from_state_dict(read_checkpoint(path), unet, label)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], unet: nn.Module, label: str = "PuLID v1.1") -> PuLIDSDXL:
        encoder = _part(state, "id_adapter", label)
        layers = {}
        for index, name in cross_attention_names(unet):
            attn = unet.get_submodule(name[: -len(".processor")])
            layers[index] = (name, attn.to_k.out_features, attn.to_k.in_features)
        attention = _part(state, "id_adapter_attn_layers", label)
        numbered = sorted({int(key.split(".")[0]) for key in attention if key.split(".")[0].isdigit()})
        if numbered != sorted(layers):
            raise CheckpointError(
                f"{label} was made for a UNet whose cross-attention layers are at positions {numbered} of "
                f"unet.attn_processors, while this UNet's are at {sorted(layers)}: use a PuLID file made for this "
                "base model (v1.1 is for SDXL)"
            )
        adapter = cls(IDFormerConfig.from_state_dict(encoder, f"{label} (id_adapter)"), layers)
        _load_exactly(adapter, state, label)
        return adapter

    def install(self, unet: nn.Module) -> None:
        """Put the PuLID processors on ``unet``'s cross-attention layers; the self-attention ones stay."""
        processors = dict(unet.attn_processors)
        for index, name in self.processor_names.items():
            processors[name] = self.id_adapter_attn_layers[str(index)]
        unet.set_attn_processor(processors)

    def encode(self, faces: Sequence[PuLIDFace]) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_identity`` with this file's encoder: (id_embedding, uncond_id_embedding)."""
        return encode_identity(self.id_adapter, faces)


# ----------------------------------------------------------------------------------------------------------------
# PuLID v1.1 loaded for generation beside FaceID (ModelSet.load_method("pulid", FOLDER))
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_V11 = "pulid_v1.1.safetensors"
V11_NUM_ZERO = 20
V11_ORTHO = "v2"
"""The authors' app (``app_v1_1.py``) runs v1.1 with ``num_zero`` 20 and ``ortho`` v2 (its id_scale is 0.8): the
method row's defaults of ``pulid_num_zero``, ``pulid_ortho`` and ``scale``, which a call may change."""


def _face_encoder_for(encoder: Any, checkpoint: str | Path, eva_clip: str | Path, parsing: str | Path):
    """The face side (``PuLIDFaceEncoder``: EVA-CLIP's tower and BiSeNet, read strictly) for the ID encoder whose
    config is ``encoder`` (of the file ``checkpoint``), refused unless the tower is the one it reads: its width, and
    512 (the antelopev2 embedding) + its projection as the id condition."""
    face_encoder = PuLIDFaceEncoder.from_files(eva_clip, parsing)
    tower = face_encoder.eva.config
    if (tower.width, tower.embed_dim + 512) != (encoder.eva_width, encoder.id_cond_dim):
        raise CheckpointError(
            f"the EVA-CLIP tower ({eva_clip}: width {tower.width}, projection {tower.embed_dim}) does not fit "
            f"{Path(checkpoint).name} (it reads EVA width {encoder.eva_width} and a {encoder.id_cond_dim}-wide id "
            "condition, 512 + the projection): use EVA02_CLIP_L_336_psz14_s6B.pt"
        )
    return face_encoder


def _method_files(folder: str | Path | None, checkpoint: str, title: str) -> tuple[Path, Path, Path]:
    """The three files a PuLID release loads from one folder, by their released names: ``checkpoint``
    (guozinan/PuLID), ``EVA02_CLIP_L_336_psz14_s6B.pt`` (QuanSun/EVA-CLIP) and ``parsing_bisenet.pth`` (facexlib's
    release v0.2.0); a folder without them is refused, naming what to download. ``folder`` None: the method
    table's pinned files, downloaded (or found in the caches) and checked against their sha256."""
    if folder is None:
        return _fetched_files(checkpoint)
    folder = Path(folder).expanduser()
    files = (folder / checkpoint, folder / EVA_CLIP_FILE, folder / PARSING_FILE)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a {title} folder: it has no {' and no '.join(missing)}. Put into one folder "
            f"{checkpoint} (https://huggingface.co/guozinan/PuLID), {EVA_CLIP_FILE} "
            f"(https://huggingface.co/QuanSun/EVA-CLIP) and {PARSING_FILE} "
            "(https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth), and give that folder"
        )
    return files


def _fetched_files(checkpoint: str) -> tuple[Path, Path, Path]:
    """The pinned release files of the method whose checkpoint is ``checkpoint``: the Hub files at their commits,
    facexlib's BiSeNet from its release tag, each refused unless its sha256 is the table's."""
    from ..hub import fetch_asset
    from . import METHODS, fetch_method_file

    method = next(m for m in METHODS.values() if any(f.filename == checkpoint for f in m.files))
    fetched = {file.filename: fetch_method_file(file) for file in method.files_for()}
    (parsing,) = (fetch_asset(asset) for asset in method.assets if asset.filename == PARSING_FILE)
    return fetched[checkpoint], fetched[EVA_CLIP_FILE], parsing


def pulid_files(folder: str | Path | None) -> tuple[Path, Path, Path]:
    """PuLID v1.1's files in ``folder`` (``pulid_v1.1.safetensors``, EVA-CLIP, BiSeNet): see ``_method_files``."""
    return _method_files(folder, CHECKPOINT_V11, "PuLID")


class PuLIDCall(CallAttention):
    """One call's PuLID identity on a UNet whose cross-attention layers have FaceID's processors: given as
    ``cross_attention_kwargs["ip_hidden_states"]``, each of those processors hands the layer to PuLID's processor
    for it (``attend``) with the call's ``PuLIDTokens``. ``set_open`` shuts the identity for the steps outside the
    call's identity window (the layer is then plain attention). Made per call; ``layers`` is read only."""

    def __init__(self, tokens: PuLIDTokens, layers: dict[nn.Module, PuLIDAttnProcessor]):
        self.tokens = tokens
        self.layers = layers
        self._open = True

    def set_open(self, open_: bool) -> None:
        self._open = bool(open_)

    def attend(self, processor, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        pulid = self.layers.get(processor)
        if pulid is None:
            raise FaceIDError(
                "PuLID has no processor for this cross-attention layer: the UNet's processors were replaced after "
                "PuLID was loaded; remove_method('pulid') and load it again"
            )
        identity = self.tokens if self._open else None
        return pulid(attn, hidden_states, encoder_hidden_states, attention_mask, temb, identity)


class PuLID:
    """PuLID v1.1 loaded next to an SDXL UNet that has FaceID's processors: the released file (the ID encoder
    and a processor per cross-attention layer), the EVA-CLIP tower and BiSeNet (``PuLIDFaceEncoder``). Nothing is
    put on the UNet: a call's ``PuLIDCall`` reaches each layer through FaceID's processor there. Create it with
    ``PuLID.load``."""

    name = "pulid"

    def __init__(self, adapter: PuLIDSDXL, face_encoder: Any, layers: dict[nn.Module, PuLIDAttnProcessor]):
        self.adapter = adapter
        self.face_encoder = face_encoder
        self.layers = layers

    @classmethod
    def load(cls, unet: nn.Module, checkpoint: str | Path, eva_clip: str | Path, parsing: str | Path) -> PuLID:
        """Read the three files strictly (a missing, extra or misshapen key is a ``CheckpointError`` naming it)
        and check they fit together and this UNet. The encoder, EVA and BiSeNet run in float32 on the UNet's
        device (as the authors'); the processors take the UNet's dtype."""
        from ..attention import FaceIDAttnProcessor

        adapter = PuLIDSDXL.from_file(checkpoint, unet)
        face_encoder = _face_encoder_for(adapter.id_adapter.config, checkpoint, eva_clip, parsing)
        processors = unet.attn_processors
        layers: dict[nn.Module, PuLIDAttnProcessor] = {}
        for index, name in adapter.processor_names.items():
            current = processors[name]
            if not isinstance(current, FaceIDAttnProcessor):
                raise FaceIDError(
                    f"PuLID runs beside FaceID's processors, and {name} has a {type(current).__name__}: load PuLID on "
                    "a FaceIDPipeline whose FaceID adapter is attached (pipe.adapter.reattach())"
                )
            layers[current] = adapter.id_adapter_attn_layers[str(index)]
        param = next(unet.parameters())
        adapter.id_adapter.to(param.device, torch.float32)
        adapter.id_adapter_attn_layers.to(param.device, param.dtype)
        adapter.eval().requires_grad_(False)
        face_encoder.to(param.device, torch.float32)
        return cls(adapter, face_encoder, layers)

    def remove(self) -> None:
        """Nothing of PuLID is on the UNet: dropping this object unloads it."""
        self.layers = {}

    @torch.no_grad()
    def identity_tokens(self, faces: Sequence[Any]):
        """One person's tokens (``IdentityTokens``: cond and uncond, each (1, tokens, width)) from the analysed
        faces of their photos (antelopev2's raw embedding and ``Face.crop_ffhq``): several photos are one
        identity, read by the encoder together (v1.1)."""
        from .instantid import IdentityTokens

        if any(face is None for face in faces):
            raise FaceIDError(
                "PuLID reads the face photo itself (EVA-CLIP features of its aligned, parsed crop): give the "
                "photo (a path, image or array) or its analysed Face, not an embedding"
            )
        cond, uncond = self.adapter.encode([self.face_encoder(face) for face in faces])
        return IdentityTokens(cond=cond, uncond=uncond)

    def call(
        self,
        context: torch.Tensor,
        scale: float | Sequence[float] | torch.Tensor,
        num_zero: int = V11_NUM_ZERO,
        ortho: str = V11_ORTHO,
    ) -> PuLIDCall:
        """A call's ``PuLIDCall``: ``context`` the tokens of each sample of the UNet batch (uncond rows first
        with classifier-free guidance), ``scale`` the id_scale, ``num_zero`` and ``ortho`` the call's (the
        settings' ``pulid_num_zero`` and ``pulid_ortho``; default the authors' app's)."""
        dtype = next(iter(self.adapter.id_adapter_attn_layers.parameters())).dtype
        return PuLIDCall(PuLIDTokens(context.to(dtype), scale, num_zero, ortho), self.layers)


# ----------------------------------------------------------------------------------------------------------------
# FLUX.1 (v0.9.1): cross-attention modules between the transformer's blocks
# ----------------------------------------------------------------------------------------------------------------

FLUX_KWARG = "pulid"
"""The ``joint_attention_kwargs`` key a call's ``PuLIDIdentity`` travels in."""


@dataclass(frozen=True)
class PuLIDIdentity:
    """One call's PuLID identity for FLUX: ``joint_attention_kwargs={"pulid": PuLIDIdentity(tokens, weight)}``.

    ``embedding`` (batch or 1, tokens, dim): the encoder's tokens, one row per sample of the transformer batch
    (e.g. [identity, uncond identity] for a true-CFG batch); ``weight``: the id_weight, a number or one per sample.
    """

    embedding: torch.Tensor
    weight: float | Sequence[float] | torch.Tensor = 1.0

    def weight_for(self, batch: int, like: torch.Tensor) -> float | torch.Tensor:
        if isinstance(self.weight, (int, float)):
            return float(self.weight)
        value = torch.as_tensor(self.weight, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)
        if value.shape[0] not in (1, batch):
            raise FaceIDError(f"the PuLID id_weight has {value.shape[0]} values but the batch is {batch}")
        return value


class PuLIDFluxBlock(nn.Module):
    """A FLUX transformer block (double or single) followed by PuLID's cross-attention term.

    It takes the call's ``PuLIDIdentity`` out of ``joint_attention_kwargs`` (so the block's attention never sees
    it), runs the block, then, when it has a CA module and the call has an identity,
    ``image_tokens += weight * ca(identity tokens, image_tokens)``. diffusers' single blocks already return the
    image part apart from the text part, which is what the authors' single-block term reads.
    """

    def __init__(self, block: nn.Module, ca: nn.Module | None):
        super().__init__()
        self.block = block
        self.ca = ca

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: Any = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        identity = None
        if joint_attention_kwargs and FLUX_KWARG in joint_attention_kwargs:
            joint_attention_kwargs = dict(joint_attention_kwargs)
            identity = joint_attention_kwargs.pop(FLUX_KWARG)
        encoder_hidden_states, hidden_states = self.block(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            image_rotary_emb=image_rotary_emb,
            joint_attention_kwargs=joint_attention_kwargs,
        )
        if identity is not None and self.ca is not None and getattr(identity, "open", True):
            batch = hidden_states.shape[0]
            embedding = identity.embedding
            if embedding.shape[0] not in (1, batch):
                raise FaceIDError(f"PuLID identity tokens have batch {embedding.shape[0]} but the batch is {batch}")
            embedding = embedding.expand(batch, -1, -1).to(hidden_states.dtype)
            hidden_states = hidden_states + identity.weight_for(batch, hidden_states) * self.ca(
                embedding, hidden_states
            )
        return encoder_hidden_states, hidden_states


def flux_ca_positions(
    double_blocks: int,
    single_blocks: int,
    double_interval: int = FLUX_DOUBLE_INTERVAL,
    single_interval: int = FLUX_SINGLE_INTERVAL,
) -> tuple[list[int | None], list[int | None]]:
    """Which CA module (by its number ``k`` in ``pulid_ca.{k}``) acts after each double and each single block.

    The authors' rule for any depth: after double block i when ``i % double_interval == 0``, after single block
    i when ``i % single_interval == 0``, with k counting up across both loops. FLUX.1-dev's 19 double and 38
    single blocks use ceil(19/2) + ceil(38/4) = 10 + 10 = 20 modules, the released file's 20. A shallower
    transformer uses the first ``ceil(D/2) + ceil(S/4)`` (the tiny 3/5 test model: double 0, 2 -> k 0, 1; single
    0, 4 -> k 2, 3); a deeper one would need more modules than the file has and is refused.
    """
    k = 0
    double: list[int | None] = []
    for i in range(double_blocks):
        double.append(k if i % double_interval == 0 else None)
        k += i % double_interval == 0
    single: list[int | None] = []
    for i in range(single_blocks):
        single.append(k if i % single_interval == 0 else None)
        k += i % single_interval == 0
    return double, single


class PuLIDFlux(nn.Module):
    """PuLID-FLUX v0.9.1: the ID encoder (``pulid_encoder``) and the cross-attention modules (``pulid_ca``).

    ``PuLIDFlux.from_file("pulid_flux_v0.9.1.safetensors")`` reads and checks the file (every size from its
    tensors); ``attach(transformer)`` wraps a diffusers ``FluxTransformer2DModel``'s blocks once. A call passes
    ``joint_attention_kwargs={"pulid": PuLIDIdentity(tokens, id_weight)}``; without it the transformer is the
    base model. The wrappers rename the blocks' modules (``transformer_blocks.0.block.attn...``), so load LoRAs
    into the transformer before attaching, or ``detach`` first.
    """

    def __init__(self, encoder: IDFormerConfig, ca_count: int, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.pulid_encoder = IDFormer(encoder)
        self.pulid_ca = nn.ModuleList(
            PerceiverAttention(dim, CA_DIM_HEAD, heads, kv_dim=kv_dim, attend_to_latents=False) for _ in range(ca_count)
        )

    @classmethod
    def from_file(cls, path: str | Path) -> PuLIDFlux:
        return cls.from_state_dict(read_checkpoint(path), Path(path).name)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], label: str = "PuLID-FLUX") -> PuLIDFlux:
        encoder = IDFormerConfig.from_state_dict(_part(state, "pulid_encoder", label), f"{label} (pulid_encoder)")
        ca = _part(state, "pulid_ca", label)
        count = _count(ca, "", separator="")
        to_q = _tensor(ca, "0.to_q.weight", f"{label} (pulid_ca)")
        to_kv = _tensor(ca, "0.to_kv.weight", f"{label} (pulid_ca)")
        adapter = cls(encoder, count, dim=to_q.shape[1], kv_dim=to_kv.shape[1], heads=to_q.shape[0] // CA_DIM_HEAD)
        _load_exactly(adapter, state, label)
        return adapter

    def attach(
        self,
        transformer: nn.Module,
        double_interval: int = FLUX_DOUBLE_INTERVAL,
        single_interval: int = FLUX_SINGLE_INTERVAL,
    ) -> None:
        """Wrap every block of ``transformer`` (``PuLIDFluxBlock``), with its CA module where the rule puts one."""
        if any(isinstance(b, PuLIDFluxBlock) for b in transformer.transformer_blocks):
            raise FaceIDError("PuLID is already attached to this transformer")
        double, single = flux_ca_positions(
            len(transformer.transformer_blocks),
            len(transformer.single_transformer_blocks),
            double_interval,
            single_interval,
        )
        width = getattr(transformer, "inner_dim", None)
        if self.pulid_ca and width is not None and width != self.pulid_ca[0].to_q.in_features:
            raise CheckpointError(
                f"this PuLID-FLUX file is for a transformer of width {self.pulid_ca[0].to_q.in_features}, this one "
                f"has width {width}"
            )
        needed = 1 + max((k for k in double + single if k is not None), default=-1)
        if needed > len(self.pulid_ca):
            raise CheckpointError(
                f"this transformer's {len(double)} double and {len(single)} single blocks need {needed} PuLID "
                f"cross-attention modules, the file has {len(self.pulid_ca)}"
            )
        for blocks, positions in (
            (transformer.transformer_blocks, double),
            (transformer.single_transformer_blocks, single),
        ):
            for i, k in enumerate(positions):
                blocks[i] = PuLIDFluxBlock(blocks[i], None if k is None else self.pulid_ca[k])

    @staticmethod
    def detach(transformer: nn.Module) -> None:
        """Put the transformer's own blocks back."""
        for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
            for i, block in enumerate(blocks):
                if isinstance(block, PuLIDFluxBlock):
                    blocks[i] = block.block

    def encode(self, face: PuLIDFace) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_identity`` with this file's encoder (one photo, as the authors' FLUX pipeline)."""
        return encode_identity(self.pulid_encoder, [face])


# ----------------------------------------------------------------------------------------------------------------
# PuLID-FLUX v0.9.1 for one call: its identity in the transformer's joint_attention_kwargs, true CFG's negative pass
# ----------------------------------------------------------------------------------------------------------------


class StepGate:
    """One per-call switch the call's step callback opens and shuts between steps (``set_open``)."""

    def __init__(self) -> None:
        self.open = True

    def set_open(self, open_: bool) -> None:
        self.open = bool(open_)


class PuLIDFluxCall:
    """One call's PuLID-FLUX identity: the encoder's tokens of each image (``identity``, one row per image, or one
    for all), the unconditional ones (``uncond``: what the authors' true CFG gives its negative pass) and the
    id_weight. ``set_open`` shuts it for the steps before the call's start step (outside its identity window): the
    blocks then run as the base model. ``negative_pass`` is shut for the steps before true CFG's start step (the
    authors' ``timestep_to_start_cfg``): those steps are the prompt's pass alone. Made per call and changed by that
    call only (its step callback)."""

    def __init__(self, identity: torch.Tensor, uncond: torch.Tensor, weight: float | Sequence[float] = 1.0):
        self.identity = PuLIDIdentity(identity, weight)
        self.uncond = PuLIDIdentity(uncond, weight)
        self._open = True
        self.negative_pass = StepGate()

    def set_open(self, open_: bool) -> None:
        self._open = bool(open_)

    def transformer(self, transformer: nn.Module, negative_embeds: torch.Tensor | None = None) -> PuLIDFluxTransformer:
        """The call's view of ``transformer`` that gives its blocks this identity (``PuLIDFluxTransformer``)."""
        return PuLIDFluxTransformer(transformer, self, negative_embeds)

    def for_pass(self, negative: bool) -> PuLIDIdentity | None:
        """What the transformer's blocks read in this pass: None while shut."""
        if not self._open:
            return None
        return self.uncond if negative else self.identity


class PuLIDFluxTransformer:
    """One call's view of a FLUX transformer that PuLID-FLUX is attached to (``PuLIDFlux.attach``): each forward
    gets the call's identity in ``joint_attention_kwargs["pulid"]`` (the blocks' wrappers read it there), the
    conditional identity in the prompt's pass and the unconditional one in true CFG's negative pass (the forward
    whose ``encoder_hidden_states`` is the call's ``negative_prompt_embeds``: diffusers' FLUX pipelines hand the
    embeddings they are given to the transformer as they are, and give both passes the same
    ``joint_attention_kwargs``). The call's pipeline object gets this in place of its transformer; everything else
    (config, dtype, device...) is the transformer's, and nothing is set on it.

    True CFG's start step: diffusers runs the negative pass at every step and returns
    ``negative + true_cfg * (prompt - negative)``. At a step before the start (``call.negative_pass`` shut) the
    negative pass is not run: it answers with the prompt pass's own output of that step, so that sum is the
    prompt's prediction exactly (``x + s * (x - x) == x``), what the authors' denoise gives a step without it."""

    def __init__(self, transformer: nn.Module, call: PuLIDFluxCall, negative_embeds: torch.Tensor | None = None):
        self.transformer = transformer
        self.call = call
        self.negative_embeds = negative_embeds
        self._prompt_output: Any = None  # this step's prompt pass, while the negative pass is shut

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transformer, name)

    def __call__(self, *args: Any, joint_attention_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        negative = self.negative_embeds is not None and kwargs.get("encoder_hidden_states") is self.negative_embeds
        skipped = self.negative_embeds is not None and not self.call.negative_pass.open
        if negative and skipped:
            if self._prompt_output is None:
                raise FaceIDError(
                    "internal error: a negative pass before the prompt's pass of its step; please report it"
                )
            output, self._prompt_output = self._prompt_output, None
            return output
        identity = self.call.for_pass(negative=negative)
        extra = dict(joint_attention_kwargs or {})
        extra.pop(FLUX_KWARG, None)
        if identity is not None:
            extra[FLUX_KWARG] = identity
        output = self.transformer(*args, joint_attention_kwargs=extra or None, **kwargs)
        if skipped:
            self._prompt_output = output
        return output


CHECKPOINT_FLUX = "pulid_flux_v0.9.1.safetensors"


def pulid_flux_files(folder: str | Path | None) -> tuple[Path, Path, Path]:
    """PuLID-FLUX v0.9.1's files in ``folder`` (``pulid_flux_v0.9.1.safetensors``, EVA-CLIP, BiSeNet): see
    ``_method_files``."""
    return _method_files(folder, CHECKPOINT_FLUX, "PuLID-FLUX")


class PuLIDFluxMethod:
    """PuLID-FLUX v0.9.1 loaded on a FLUX.1 model set (``ModelSet.load_method("pulid-flux", FOLDER)``): the released
    file (the ID encoder and the cross-attention modules, attached once to the transformer's blocks at the released
    intervals: ``PuLIDFlux.attach``), the EVA-CLIP tower and BiSeNet (``PuLIDFaceEncoder``). A call without PuLID
    passes no identity, and the wrapped blocks are the base model's; a PuLID call runs on its own
    ``PuLIDFluxCall`` (``call``). Create it with ``PuLIDFluxMethod.load``."""

    name = "pulid-flux"

    def __init__(self, adapter: PuLIDFlux, face_encoder: Any, transformer: nn.Module):
        self.adapter = adapter
        self.face_encoder = face_encoder
        self.transformer = transformer

    @classmethod
    def load(
        cls,
        transformer: nn.Module,
        checkpoint: str | Path,
        eva_clip: str | Path,
        parsing: str | Path,
        *,
        device: torch.device | str | None = None,
    ) -> PuLIDFluxMethod:
        """Read the three files strictly (a missing, extra or misshapen key is a ``CheckpointError`` naming it), check
        they fit together and this transformer, and attach the cross-attention modules. The encoder, EVA and BiSeNet
        run in float32 on ``device`` (default: the transformer's; as the authors'); the cross-attention modules take
        the transformer's dtype and place (with CPU offload they move with it)."""
        adapter = PuLIDFlux.from_file(checkpoint)
        face_encoder = _face_encoder_for(adapter.pulid_encoder.config, checkpoint, eva_clip, parsing)
        param = next(transformer.parameters())
        place = param.device
        runs = torch.device(device) if device is not None else place
        adapter.pulid_encoder.to(runs, torch.float32)
        adapter.pulid_ca.to(place, transformer.dtype)
        adapter.eval().requires_grad_(False)
        face_encoder.to(runs, torch.float32)
        adapter.attach(transformer)  # refuses a transformer of another width, or deeper than the file
        return cls(adapter, face_encoder, transformer)

    def remove(self) -> None:
        """The transformer's own blocks back."""
        PuLIDFlux.detach(self.transformer)

    @torch.no_grad()
    def identity_tokens(self, faces: Sequence[Any]):
        """One person's tokens (``IdentityTokens``: cond and uncond, each (1, tokens, width)) from the analysed faces
        of their photos (antelopev2's raw embedding and ``Face.crop_ffhq``); several photos are read by the encoder
        together, as v1.1's (the authors' FLUX app takes one)."""
        from .instantid import IdentityTokens

        if any(face is None for face in faces):
            raise FaceIDError(
                "PuLID-FLUX reads the face photo itself (EVA-CLIP features of its aligned, parsed crop): give the "
                "photo (a path, image or array) or its analysed Face, not an embedding"
            )
        cond, uncond = encode_identity(self.adapter.pulid_encoder, [self.face_encoder(face) for face in faces])
        return IdentityTokens(cond=cond, uncond=uncond)

    def call(
        self, identity: torch.Tensor, uncond: torch.Tensor, weight: float | Sequence[float] | torch.Tensor
    ) -> PuLIDFluxCall:
        """A call's ``PuLIDFluxCall``: the tokens of each image of the transformer batch, their unconditional ones
        (true CFG's negative pass) and the id_weight."""
        dtype = self.transformer.dtype
        return PuLIDFluxCall(identity.to(dtype), uncond.to(dtype), weight)
