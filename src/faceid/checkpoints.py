"""Reading the official IP-Adapter-FaceID checkpoints and saying what they are.

Two on-disk layouts hold the same tensors (SPEC.md section 3):

* ``.bin``: a pickled ``{"image_proj": {...}, "ip_adapter": {...}}`` (read with ``weights_only=True``);
* ``.safetensors``: the same tensors, flat, as ``image_proj.<key>`` / ``ip_adapter.<key>``.

``ip_adapter`` keys are numbered by the position of each attention processor in diffusers'
``unet.attn_processors`` order (even = self-attention, odd = cross-attention). That positional format
is the ecosystem's and is kept on disk; ``AdapterSpec`` reads everything the model needs (widths,
token count, LoRA rank, perceiver shape) off the tensors, so no variant has to be named by the user.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import CheckpointError
from .projection import PerceiverConfig
from .variants import FAMILIES, Architecture, closest_architecture, match_architectures

GROUPS = ("image_proj", "ip_adapter")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # checkpoint names; ``to_out`` is diffusers' ``to_out.0``
_IP_KEY = re.compile(r"^(\d+)\.(to_[qkv]_lora|to_out_lora)\.(down|up)\.weight$|^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def family_name(cross_attention_dim: int) -> str:
    return FAMILIES.get(cross_attention_dim, f"a UNet with cross-attention dim {cross_attention_dim}")


def describe_unet(cross_attention_dim: int, cross_layers: int) -> str:
    """``SD1.5 (cross-attention dim 768, 16 cross-attention layers)``, or the numbers alone if unknown."""
    family = FAMILIES.get(cross_attention_dim)
    numbers = f"cross-attention dim {cross_attention_dim}, {cross_layers} cross-attention layers"
    return f"{family} ({numbers})" if family else f"a UNet with {numbers}"


def load_state_dict(
    path: str | Path, groups: tuple[str, ...] = GROUPS, kind: str = "IP-Adapter-FaceID"
) -> dict[str, dict[str, torch.Tensor]]:
    """Read an adapter file in either official layout into ``{group: state dict}``: by default an
    IP-Adapter-FaceID file's ``{"image_proj": ..., "ip_adapter": ...}``; other methods name their own ``groups``
    (InfiniteYou's ``image_proj_model.bin`` holds ``image_proj`` alone) and the ``kind`` of file errors name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter checkpoint not found: {path}")
    named = " and ".join(repr(g) for g in groups)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path), device="cpu")
            found: dict[str, dict[str, torch.Tensor]] = {g: {} for g in groups}
            for key, tensor in flat.items():
                group, _, rest = key.partition(".")
                if group not in found or not rest:
                    raise CheckpointError(
                        f"{path.name}: unexpected key {key!r}; an {kind} .safetensors file holds only "
                        + " and ".join(f"'{g}.*'" for g in groups)
                        + " tensors"
                    )
                found[group][rest] = tensor
        else:
            # weights_only=True: a pickle can run code on load; a state dict of tensors needs none of that.
            found = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # unreadable, truncated, not a checkpoint at all
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        if isinstance(exc, pickle.UnpicklingError):  # torch's own text suggests weights_only=False: never
            reason = "not a pickle of tensors only (faceid never loads pickles that could run code)"
        raise CheckpointError(
            f"cannot read adapter checkpoint {path} ({type(exc).__name__}: {reason[:300]}); is it an "
            f"{kind} .bin/.safetensors file, complete and not corrupted?"
        ) from exc
    if not isinstance(found, dict) or set(found) != set(groups):
        what = sorted(found) if isinstance(found, dict) else type(found).__name__
        raise CheckpointError(f"{path.name} is not an {kind} checkpoint: expected the groups {named}, found {what}")
    return found


def perceiver_config(proj: dict[str, torch.Tensor], prefix: str, width: int) -> PerceiverConfig:
    """The shape of a perceiver resampler whose tensors are ``proj[prefix + ...]`` and whose width is ``width``:
    FaceID-Plus's (``perceiver_resampler.``) and IP-Adapter-Plus's ``Resampler`` (no prefix) alike.
    A missing tensor raises ``KeyError`` with its key."""
    layer = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.")
    inner = proj[f"{prefix}layers.0.0.to_q.weight"].shape[0]
    ff = proj[f"{prefix}layers.0.1.1.weight"].shape[0]
    return PerceiverConfig(
        clip_dim=proj[f"{prefix}proj_in.weight"].shape[1],
        depth=1 + max(int(m.group(1)) for k in proj if (m := layer.match(k))),
        dim_head=64 if inner % 64 == 0 else inner,
        ff_mult=ff // width,
    )


@dataclass(frozen=True)
class AdapterSpec:
    """What a checkpoint is, read off its tensors."""

    cross_attention_dim: int
    num_tokens: int
    id_dim: int
    hidden_dim: int
    perceiver: PerceiverConfig | None
    lora_rank: int | None
    # processor index -> (hidden_size, cross_attention_dim) of its to_k_ip/to_v_ip; odd indices only
    ip_layers: dict[int, tuple[int, int]] = field(default_factory=dict)
    # processor index -> {target: (in_features, out_features)} of its LoRA
    lora_layers: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)

    def _layout(self) -> tuple[bool, int, bool]:
        return self.perceiver is not None, self.num_tokens, self.lora_rank is not None

    @property
    def architectures(self) -> tuple[Architecture, ...]:
        """The rows of ``faceid.variants.ARCHITECTURES`` this file fits exactly: Plus and PlusV2 have the
        same tensors, so a Plus file fits both; () for a layout of its own (e.g. 8 tokens)."""
        return match_architectures(*self._layout())

    def architecture(self, name: str = "") -> Architecture:
        """The row to use this file as; ``name`` (its file name) tells Plus from PlusV2 (``...plusv2...``)."""
        return closest_architecture(*self._layout(), name=name)

    @property
    def variant(self) -> str:
        """``faceid``, ``faceid-plus`` (Plus or PlusV2) or ``faceid-portrait``."""
        return self.architecture().label

    @property
    def family(self) -> str:
        return family_name(self.cross_attention_dim)

    def describe(self) -> str:
        lora = f"LoRA rank {self.lora_rank}" if self.lora_rank else "no LoRA"
        target = describe_unet(self.cross_attention_dim, len(self.ip_layers))
        fits = self.architectures
        # Plus and PlusV2 have the same tensors (the shortcut is a setting), so the file cannot tell.
        if len(fits) > 1:
            kind = f"{self.variant} ({' or '.join(a.title for a in fits)})"
        else:
            kind = self.variant if fits else f"{self.variant}-like"
        return f"a {kind} adapter ({self.num_tokens} tokens, {lora}) for {target}"

    @classmethod
    def from_state_dict(cls, state: dict[str, dict[str, torch.Tensor]], name: str = "checkpoint") -> AdapterSpec:
        proj, ip = state["image_proj"], state["ip_adapter"]
        try:
            first, last, norm = proj["proj.0.weight"], proj["proj.2.weight"], proj["norm.weight"]
        except KeyError as exc:
            raise CheckpointError(
                f"{name}: 'image_proj' lacks {exc.args[0]!r}; this is not an IP-Adapter-FaceID projection "
                "(plain IP-Adapter checkpoints, which take CLIP image embeddings, are a different model)"
            ) from None
        cad = norm.shape[0]
        if last.shape[0] % cad:
            raise CheckpointError(f"{name}: projection output {last.shape[0]} is not a multiple of its width {cad}")
        perceiver = None
        if any(k.startswith("perceiver_resampler.") for k in proj):
            perceiver = perceiver_config(proj, "perceiver_resampler.", cad)

        ip_layers: dict[int, tuple[int, int]] = {}
        lora_layers: dict[int, dict[str, tuple[int, int]]] = {}
        ranks = set()
        for key, tensor in ip.items():
            match = _IP_KEY.match(key)
            if not match:
                raise CheckpointError(f"{name}: unknown key 'ip_adapter.{key}' (not an IP-Adapter-FaceID layer key)")
            if match.group(1) is not None:
                index, target, part = int(match.group(1)), match.group(2).removesuffix("_lora"), match.group(3)
                dims = lora_layers.setdefault(index, {}).setdefault(target, [0, 0])
                if part == "down":
                    ranks.add(tensor.shape[0])
                    dims[0] = tensor.shape[1]
                else:
                    dims[1] = tensor.shape[0]
            else:
                index = int(match.group(4))
                out_features, in_features = tensor.shape
                ip_layers[index] = (out_features, in_features)
        if len(ranks) > 1:
            raise CheckpointError(f"{name}: LoRA ranks differ between layers ({sorted(ranks)})")
        return cls(
            cross_attention_dim=cad,
            num_tokens=last.shape[0] // cad,
            id_dim=first.shape[1],
            hidden_dim=first.shape[0],
            perceiver=perceiver,
            lora_rank=ranks.pop() if ranks else None,
            ip_layers=dict(sorted(ip_layers.items())),
            lora_layers={i: {t: tuple(d) for t, d in v.items()} for i, v in sorted(lora_layers.items())},
        )


def save_state_dict(state: dict[str, dict[str, torch.Tensor]], path: str | Path, dtype=torch.float16) -> Path:
    """Write ``state`` in the official layout chosen by the file suffix (``.bin`` or ``.safetensors``)."""
    path = Path(path)
    cast = {g: {k: v.detach().to("cpu", dtype).contiguous() for k, v in state[g].items()} for g in GROUPS}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({f"{g}.{k}": v for g in GROUPS for k, v in cast[g].items()}, str(tmp))
        else:
            torch.save(cast, str(tmp))
    return path


# ----------------------------------------------------------------------------------------------
# diffusers models loaded strictly


def check_loading_report(report: Mapping[str, Sequence[Any]], what: str, advice: str) -> None:
    """Refuse a model whose weights did not match its config: ``report`` is the loading report of diffusers'
    ``from_pretrained(..., output_loading_info=True)``, which fills a missing tensor with a fresh random one and
    skips an unknown one with a log line only. A :class:`CheckpointError` naming the first missing, unexpected or
    mismatched key (and how many more), ``what`` saying which model (``"IdentityNet in DIR"``), ``advice`` what
    to check."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = list(report.get(kind) or [])
        if keys:
            first = keys[0][0] if isinstance(keys[0], tuple) else keys[0]  # mismatched: (key, shape, shape)
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise CheckpointError(
                f"{what} does not match its config: {kind.replace('_', ' ')} {first!r}{more}; {advice}"
            )


def loading_error(exc: Exception, what: str, advice: str) -> CheckpointError:
    """The :class:`CheckpointError` for a model folder that is there but does not load (unreadable weights, a
    tensor of another shape: diffusers raises ``size mismatch for KEY``), with the error's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # A size mismatch's first line only says "Error(s) in loading state_dict": the line that names the key.
    reason = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
    return CheckpointError(f"cannot load {what} ({type(exc).__name__}: {reason[:300]}); {advice}")
