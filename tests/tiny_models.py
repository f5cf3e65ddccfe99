"""Tiny random-weight models for the tests, built here in seconds: nothing to download, nothing outside the repo.

They have the shapes of the golden folder's models (``FORMAT.md`` of the conformance set), so a test written
against one runs against the other, but their weights are this file's own (seeded, deterministic):

* ``sd15-tiny``: a diffusers ``StableDiffusionPipeline`` folder. UNet block_out_channels (32, 64), down
  (CrossAttnDownBlock2D, DownBlock2D), up (UpBlock2D, CrossAttnUpBlock2D), layers_per_block 1,
  cross_attention_dim 64, attention_head_dim 8, sample_size 8; VAE (32, 64), vae_scale_factor 2, scaling 0.18215;
  CLIPTextModel hidden 64, 2 layers, 77 positions; DDIM (0.00085 to 0.012, scaled_linear, clip_sample False,
  set_alpha_to_one False, steps_offset 1); no safety checker.
* ``sdxl-tiny``: a ``StableDiffusionXLPipeline`` folder. UNet down (DownBlock2D, CrossAttnDownBlock2D),
  transformer_layers_per_block (1, 2), linear projections, text_time conditioning (addition_time_embed_dim 8),
  cross_attention_dim 128 = 64 + 64; text_encoder as SD1.5's, text_encoder_2 a CLIPTextModelWithProjection
  (hidden 64, 3 layers, projection 32); tokenizer_2 pads with "!"; DDIM as above.
* ``image-encoder-tiny``: CLIPVisionModelWithProjection (224 px, patch 32, hidden 48, 3 layers, 4 heads:
  50 tokens) with the transformers-default CLIPImageProcessor config.
* a CLIP tokenizer: a real byte-level BPE in CLIP's format (``vocab.json`` + ``merges.txt``: the 256 byte
  symbols, the same with ``</w>``, merges learned here from a few hundred words of prompt-like text, then
  ``<|startoftext|>`` and ``<|endoftext|>``). Any text tokenizes (unknown words fall back to bytes), and
  the text encoders' vocab_size and bos/eos/pad ids are taken from it. The real CLIP BPE (49408 tokens)
  is not needed: nothing in the tests depends on which ids a word gets, only that texts differ.
* adapter checkpoints for every variant (``faceid``, ``faceid-plusv2``, ``faceid-portrait``, ``faceid-sdxl``,
  ``faceid-plusv2-sdxl``) in both official layouts (``.bin`` and ``.safetensors``, float16 as released):
  ``faceid.adapter.initial_state_dict`` on the matching UNet, then the LoRA ``up`` weights (zero at
  initialisation) and the projection's LayerNorm are randomised so that every part of the adapter acts.

``TinyModels(root)`` builds each model the first time it is asked for and keeps it under ``root``;
``conftest.py`` shares one instance per test session (fixture ``tiny_models``).
"""

from __future__ import annotations

import collections
import functools
import json
import re
import shutil
from pathlib import Path

import torch

# ---------------------------------------------------------------------- tokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Text the BPE merges are learned from: prompts in the style the tests and the evaluation use.
CORPUS = """
a photo of a person. a photo of a person in a garden. a close-up portrait photo of a person, soft studio lighting.
a photo of a person smiling, looking at the camera. a black and white portrait photo of a person.
a side view photo of a person looking out of a window. a photo of a person laughing, candid shot.
a photo of a person riding a bicycle in a city street. a photo of a person playing the guitar on a stage.
a photo of a person cooking in a kitchen. a photo of a person reading a book in a library.
a photo of a person running on a beach at sunrise. an oil painting of a person, impressionist style.
a watercolor illustration of a person. a pencil sketch of a person. a pop art poster of a person.
a person as a character in a 3d animated film. a photo of a person wearing sunglasses and a baseball cap.
a photo of a person wearing a red scarf and a winter coat. a photo of a person wearing headphones.
a photo of a person in a business suit and tie. a photo of a person wearing a spacesuit.
a photo of a person in front of the eiffel tower. a photo of a person in a snowy forest.
a photo of a person as an astronaut, best quality. best quality, high quality.
monochrome, lowres, bad anatomy, worst quality, low quality. an oil painting of a man. a man in a suit.
a person at the beach. blue sky. a red car. a gray square. a woman with long hair in the rain.
a portrait of a man with a beard, dramatic lighting, high detail, sharp focus, photorealistic.
a portrait of a woman, cinematic lighting, film grain, bokeh, depth of field, masterpiece.
a person standing on a mountain at sunset, wide angle, landscape, clouds, golden hour.
a person sitting in a cafe, drinking coffee, morning light, shallow depth of field.
an anime drawing of a person, colorful, detailed. a statue of a person made of marble.
a person walking a dog in a park in autumn, leaves, trees, warm colors.
photo of alice. photo of bob. photo of carol. a photo of alice, a photo of bob and a photo of carol.
"""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


# The pre-tokenizer split of CLIP's tokenizer (letters, single digits, runs of other non-space characters).
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def learn_bpe(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges learned from ``corpus``, CLIP style (``</w>`` marks a word's last symbol).

    Greedy: the most frequent adjacent pair is merged first; ties go to the pair that sorts first, so the
    result depends on nothing but the corpus. Stops early when no pair occurs twice.
    """
    byte_chars = bytes_to_unicode()
    counts = collections.Counter(
        "".join(byte_chars[b] for b in word.encode("utf-8")) for word in _WORDS.findall(corpus.lower())
    )
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter = collections.Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merges.append(best)
        merged = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


@functools.lru_cache(maxsize=1)
def clip_bpe(num_merges: int = 400) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of the tests' CLIP tokenizer, in the order CLIP's vocab.json has them."""
    merges = learn_bpe(CORPUS, num_merges)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(set(tokens)) == len(tokens), "a merge produced a token twice"
    return {token: i for i, token in enumerate(tokens)}, tuple(merges)


def vocab_size() -> int:
    return len(clip_bpe()[0])


def token_ids() -> dict[str, int]:
    """Config ids of the special tokens, for the text encoders (pad is <|endoftext|>, as in CLIP)."""
    vocab = clip_bpe()[0]
    return {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}


def write_clip_tokenizer(folder: str | Path, pad_token: str = EOS) -> Path:
    """A CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = special | {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# ---------------------------------------------------------------------- model parts
def make_tiny_unet(cross_attention_dim: int = 64, seed: int = 0):
    """The SD1.5-shaped tiny UNet (two resolutions, 8 attention layers: 4 attn1 + 4 attn2)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def unet_inputs(unet, batch: int = 2, tokens: int = 4, seed: int = 1) -> tuple[dict, torch.Tensor]:
    """Random inputs of one step of a tiny SD1.5-shaped UNet (8x12 latents, 77 text tokens), and ``tokens``
    identity tokens per sample: ``(unet(**inputs) arguments, identity tokens)``."""
    generator = torch.Generator().manual_seed(seed)
    cad = unet.config.cross_attention_dim
    return {
        "sample": torch.randn(batch, 4, 8, 12, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, cad, generator=generator),
    }, torch.randn(batch, tokens, cad, generator=generator)


def make_tiny_sdxl_unet(seed: int = 0):
    """The SDXL-shaped tiny UNet: text_time conditioning, 2 transformer layers in the lower block (16 attention layers)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # pooled text (32) + 6 size/crop numbers x 8
        cross_attention_dim=128,
        norm_num_groups=32,
    ).eval()


def make_tiny_vae(scaling_factor: float = 0.18215, force_upcast: bool = False, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    ).eval()


def make_tiny_autoencoder(folder, seed=0, latent_channels=4, blocks=2):
    """A random-weight AutoencoderTiny with the tiny models' 2x upsampling (two blocks of 8 channels), saved."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8,) * blocks,
        decoder_block_out_channels=(8,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        latent_channels=latent_channels,
    )
    vae.save_pretrained(folder)
    return folder


def make_tiny_text_encoder(seed: int = 0, with_projection: bool = False):
    """SD1.5's tiny CLIPTextModel (quick_gelu, 2 layers), or SDXL's second encoder (gelu, 3 layers, projection 32)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3 if with_projection else 2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if with_projection else "quick_gelu",
        projection_dim=32 if with_projection else 64,
        **token_ids(),
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def make_ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# ---------------------------------------------------------------------- whole folders
def _own_random_numbers(build):
    """Run a builder on its own seeds: the caller's global random state is the same afterwards."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return build(*args, **kwargs)

    return wrapper


@_own_random_numbers
def build_sd15(folder: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline saved in diffusers format (loads offline with from_pretrained)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_src"))
    pipe = StableDiffusionPipeline(
        vae=make_tiny_vae(seed=seed + 1),
        text_encoder=make_tiny_text_encoder(seed=seed + 2),
        tokenizer=tokenizer,
        unet=make_tiny_unet(64, seed=seed + 3),
        scheduler=make_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    _replace_tokenizer(folder / "tokenizer")
    _remove(folder / "_tokenizer_src")
    return folder


@_own_random_numbers
def build_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline saved in diffusers format; text_encoder is SD1.5's (same seed)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_src"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_2_src", pad_token="!"))
    pipe = StableDiffusionXLPipeline(
        vae=make_tiny_vae(scaling_factor=0.13025, force_upcast=True, seed=seed + 1),
        text_encoder=make_tiny_text_encoder(seed=seed + 2),
        text_encoder_2=make_tiny_text_encoder(seed=seed + 4, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=make_tiny_sdxl_unet(seed=seed + 3),
        scheduler=make_ddim_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    _replace_tokenizer(folder / "tokenizer")
    _replace_tokenizer(folder / "tokenizer_2", pad_token="!")
    for name in ("_tokenizer_src", "_tokenizer_2_src"):
        _remove(folder / name)
    return folder


def _replace_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    """The tokenizer folder exactly as CLIP's slow files describe it (what save_pretrained wrote is dropped)."""
    _remove(folder)
    write_clip_tokenizer(folder, pad_token=pad_token)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@_own_random_numbers
def build_image_encoder(folder: str | Path, seed: int = 0) -> Path:
    """A tiny CLIPVisionModelWithProjection (50 tokens of width 48) with a default CLIPImageProcessor config."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    config = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=24,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # shortest edge 224, bicubic, centre crop 224, OpenAI mean/std
    return folder


# variant -> (base model, num_tokens, LoRA rank, Plus perceiver)
ADAPTERS = {
    "faceid": ("sd15", 4, 8, False),
    "faceid-plusv2": ("sd15", 4, 4, True),
    "faceid-portrait": ("sd15", 16, None, False),
    "faceid-sdxl": ("sdxl", 4, 8, False),
    "faceid-plusv2-sdxl": ("sdxl", 4, 8, True),
}
FORMATS = ("bin", "safetensors")


def adapter_state(unet, variant: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """An adapter for ``unet`` in the official layout, with every part acting (see the module docstring)."""
    from faceid.adapter import initial_state_dict
    from faceid.projection import PerceiverConfig

    _, num_tokens, lora_rank, plus = ADAPTERS[variant]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the projection's layers take PyTorch's default initialisation (global generator)
    state = initial_state_dict(
        unet,
        num_tokens=num_tokens,
        lora_rank=lora_rank,
        perceiver=PerceiverConfig(clip_dim=48) if plus else None,
        generator=generator,
    )
    for key, tensor in state["ip_adapter"].items():
        if key.endswith("_lora.up.weight"):  # zero at initialisation: the LoRA would do nothing
            state["ip_adapter"][key] = torch.randn(tensor.shape, generator=generator) * 0.05
    for key in ("norm.weight", "norm.bias"):
        norm = state["image_proj"][key]
        state["image_proj"][key] = norm + torch.randn(norm.shape, generator=generator) * 0.1
    return state


@_own_random_numbers
def build_adapter(unet, variant: str, folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """``<folder>/<variant>.bin`` and ``.safetensors``: the same float16 tensors in both official layouts."""
    from faceid.checkpoints import save_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state(unet, variant, seed=seed)
    return {fmt: save_state_dict(state, folder / f"{variant}.{fmt}") for fmt in FORMATS}


# kind -> (tokens, reads the penultimate hidden states): tiny standard IP-Adapters for the tiny image encoder
REFERENCE_KINDS = {"plain": (4, False), "plus": (4, True)}


def decoupled_key_values(unet, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ``{index}.to_k_ip.weight`` / ``to_v_ip.weight`` for every cross-attention processor of ``unet``, keyed
    by its position in ``unet.attn_processors`` as the released IP-Adapter files are; weights that act, drawn from
    ``generator``."""
    ip = {}
    for index, (name, _) in enumerate(unet.attn_processors.items()):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.is_cross_attention:
            for target in ("to_k", "to_v"):
                shape = (attn.to_k.out_features, attn.to_k.in_features)
                ip[f"{index}.{target}_ip.weight"] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
    return ip


def reference_adapter_state(unet, kind: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A standard IP-Adapter (``ImageProjModel`` or ``Resampler``) for ``unet`` and the tiny image encoder
    (hidden 48, projection 24), in the official layout; random weights that act."""
    from faceid.projection import ImageProjection, ImageResampler, PerceiverConfig

    tokens, plus = REFERENCE_KINDS[kind]
    cad = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    # The Resampler as diffusers converts it: depth 4, heads of 64 (its defaults).
    projection = (
        ImageResampler(64, PerceiverConfig(clip_dim=48), tokens, cad) if plus else ImageProjection(cad, tokens, 24)
    )
    ip = decoupled_key_values(unet, torch.Generator().manual_seed(seed))
    return {"image_proj": {k: v.detach().clone() for k, v in projection.state_dict().items()}, "ip_adapter": ip}


class TinyModels:
    """The tests' tiny models under one folder, each built on first use (``root/<name>``)."""

    def __init__(self, root: str | Path, seed: int = 0):
        self.root = Path(root)
        self.seed = seed

    @functools.cached_property
    def sd15(self) -> Path:
        """Folder of the tiny SD1.5 pipeline."""
        return build_sd15(self.root / "sd15-tiny", seed=self.seed)

    @functools.cached_property
    def sdxl(self) -> Path:
        """Folder of the tiny SDXL pipeline."""
        return build_sdxl(self.root / "sdxl-tiny", seed=self.seed + 10)

    @functools.cached_property
    def image_encoder(self) -> Path:
        """Folder of the tiny CLIP image encoder (Plus variants)."""
        return build_image_encoder(self.root / "image-encoder-tiny", seed=self.seed + 20)

    @property
    def tokenizer(self) -> Path:
        """Folder of the tests' CLIP tokenizer (the one inside the SD1.5 pipeline)."""
        return self.sd15 / "tokenizer"

    @functools.cached_property
    def _adapters(self) -> dict[str, dict[str, Path]]:
        return {}

    @functools.cache  # noqa: B019 (one instance per test session)
    def reference(self, kind: str = "plain", family: str = "sd15") -> Path:
        """``adapters/ip-adapter-<kind>_<family>.bin``: a tiny standard IP-Adapter (``REFERENCE_KINDS``)."""
        from diffusers import UNet2DConditionModel

        from faceid.checkpoints import save_state_dict

        unet = UNet2DConditionModel.from_pretrained((self.sd15 if family == "sd15" else self.sdxl) / "unet")
        seed = self.seed + 200 + sorted(REFERENCE_KINDS).index(kind)
        state = _own_random_numbers(reference_adapter_state)(unet, kind, seed=seed)
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        return save_state_dict(state, self.root / "adapters" / f"ip-adapter-{kind}_{family}.bin", dtype=torch.float32)

    def adapter(self, variant: str = "faceid", fmt: str = "safetensors") -> Path:
        """``adapters/<variant>.<fmt>`` for the matching tiny base model (built with both formats)."""
        if variant not in ADAPTERS:
            raise KeyError(f"no tiny adapter {variant!r}; there are {sorted(ADAPTERS)}")
        if fmt not in FORMATS:
            raise KeyError(f"format {fmt!r}: one of {FORMATS}")
        if variant not in self._adapters:
            from diffusers import UNet2DConditionModel

            base = self.sd15 if ADAPTERS[variant][0] == "sd15" else self.sdxl
            unet = UNet2DConditionModel.from_pretrained(base / "unet")
            seed = self.seed + 100 + sorted(ADAPTERS).index(variant)
            self._adapters[variant] = build_adapter(unet, variant, self.root / "adapters", seed=seed)
        return self._adapters[variant][fmt]


# ---------------------------------------------------------------------- few-step LoRAs
# The module kinds the published few-step LoRAs adapt (attention, projections, feed-forward, ResNet convs
# and time embeddings, as LCM-LoRA does), and how their files spell the keys:
#   "kohya": lora_unet_<module, dots as _>.lora_down.weight / .lora_up.weight / .alpha, diffusers module
#            names (LCM-LoRA, SDXL-Lightning and Hyper-SD, made for A1111/ComfyUI and diffusers alike);
#   "diffusers-old": unet.<module>.lora.down.weight / .lora.up.weight, what diffusers' training scripts
#            saved in early 2024 (TCD).
FEW_STEP_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "time_emb_proj")  # fmt: skip
FEW_STEP_LAYOUTS = {"lcm": "kohya", "lightning": "kohya", "hyper": "kohya", "tcd": "diffusers-old"}


def few_step_lora_state(unet, layout: str, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet`` in a few-step LoRA's key layout (``FEW_STEP_LAYOUTS``), acting everywhere."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for path, module in unet.named_modules():
        path = path.removesuffix(".base_layer")  # a layer that already carries a (PEFT) LoRA
        if not path.endswith(FEW_STEP_TARGETS) or not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        else:
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        down = torch.randn(down_shape, generator=generator) * 0.1
        up = torch.randn(up_shape, generator=generator) * 0.1
        if layout == "kohya":
            key = "lora_unet_" + path.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
            state[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
        elif layout == "diffusers-old":
            state.update({f"unet.{path}.lora.down.weight": down, f"unet.{path}.lora.up.weight": up})
        else:
            raise KeyError(f"layout {layout!r}: one of kohya, diffusers-old")
    return {key: tensor.to(torch.float16) for key, tensor in state.items()}


def acting_loras(unet) -> dict[str, float]:
    """The LoRAs that take part in the UNet's forward passes now, with the weights they act at."""
    from faceid.peft_adapters import adapter_weights, layers_with

    return {
        name: weight
        for name, weight in adapter_weights(unet).items()
        if all(name in layer.active_adapters for layer in layers_with(unet, name).values())
    }


def make_controlnet(folder, seed):
    """A ControlNet of the tiny model in ``folder``: ``ControlNetModel.from_unet`` on a fresh copy of its UNet, with
    random (not zero) output convolutions, so that its residuals change the image."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
    return controlnet.eval().requires_grad_(False)


def make_tiny_whisper(folder: Path) -> Path:
    """A tiny random-weight Whisper (English-only) with its processor, as a transformers folder that the
    ``automatic-speech-recognition`` pipeline loads: a byte-level tokenizer (the 256 byte symbols, no merges, and
    Whisper's special tokens), 80 mel bins, one encoder and one decoder layer. It transcribes noise into a few
    arbitrary bytes: enough to test the plumbing, not the words."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]  # fmt: skip
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=64, pad_token_id=end, bos_token_id=end, eos_token_id=end,
        decoder_start_token_id=start,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, is_multilingual=False, max_length=16,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        begin_suppress_tokens=[], suppress_tokens=[],
    )  # fmt: skip
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        folder
    )
    return Path(folder)


@_own_random_numbers
def build_instantid(base: str | Path, folder: str | Path, seed: int = 0) -> Path:
    """A tiny InstantID for the tiny SDXL model in ``base``, in the released layout of ``InstantX/InstantID``:
    ``folder/ip-adapter.bin`` (a Resampler over 512-d face embeddings into 16 tokens of the UNet's width, and a
    ``to_k_ip``/``to_v_ip`` per cross-attention processor) and ``folder/ControlNetModel/`` (IdentityNet: a
    ControlNet of the UNet, its output convolutions random so that it acts). Random weights that act."""
    from diffusers import UNet2DConditionModel

    from faceid.checkpoints import save_state_dict
    from faceid.projection import ImageResampler, PerceiverConfig

    base, folder = Path(base), Path(folder)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.manual_seed(seed)
    resampler = ImageResampler(64, PerceiverConfig(clip_dim=512, depth=2), 16, unet.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(seed)
    ip = decoupled_key_values(unet, generator)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"image_proj": {k: v.detach().clone() for k, v in resampler.state_dict().items()}, "ip_adapter": ip}
    save_state_dict(state, folder / "ip-adapter.bin", dtype=torch.float32)
    identitynet = make_controlnet(base, seed + 1)
    with torch.no_grad():  # zero as from_unet makes it: the keypoint image would change nothing
        conv = identitynet.controlnet_cond_embedding.conv_out
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
    identitynet.save_pretrained(folder / "ControlNetModel")
    return folder


# ---------------------------------------------------------------------- FLUX.1
# The tiny FLUX.1: the golden's flux-tiny transformer and VAE configuration (3 double and 5 single blocks of 2 heads x
# 16, rope axes (4, 6, 6), guidance embedding, text width 32 = the tiny T5's, pooled width 16 = the tiny CLIP text
# encoder's; a VAE of 16 latent channels, vae_scale_factor 2: images of multiples of 4 pixels), so the golden's
# InfiniteYou fits it too.
FLUX_T5_WIDTH = 32
FLUX_CLIP_WIDTH = 16
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


def write_t5_tokenizer(folder: str | Path) -> Path:
    """A T5 fast tokenizer folder built offline (a ``tokenizers`` Unigram model, as T5's): T5's special tokens (pad 0,
    eos 1, unk 2), the corpus's words with SentencePiece's word-start mark and the letters, so any text of letters
    tokenizes (a known word in one token, another letter by letter), ``</s>`` appended."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    words = sorted(set(re.findall(r"[a-z]+|[^a-z\s]", CORPUS.lower())))
    letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in words] + [(c, -5.0) for c in letters if f"\u2581{c}" != c]
    fast = T5TokenizerFast(vocab=vocab, pad_token=T5_PAD, eos_token=T5_EOS, unk_token=T5_UNK, extra_ids=0)
    fast.model_max_length = 32  # FLUX pads the prompt to this many T5 tokens (FLUX.1-dev: 512)
    fast.save_pretrained(folder)
    return folder


def make_tiny_t5(vocab: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab, d_model=FLUX_T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def make_tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=3, num_single_layers=5, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=FLUX_T5_WIDTH, pooled_projection_dim=FLUX_CLIP_WIDTH, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def make_tiny_flux_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=16,
        norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, force_upcast=True,
    ).eval()  # fmt: skip


def make_tiny_flux_clip(seed: int = 0):
    """FLUX's CLIP text encoder, tiny: its pooled output (width 16) is the transformer's pooled projection input."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=FLUX_CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=FLUX_CLIP_WIDTH,
        **token_ids(),
    )  # fmt: skip
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


@_own_random_numbers
def build_flux(folder: str | Path, seed: int = 0) -> Path:
    """A tiny FluxPipeline saved in diffusers format: the tiny CLIP text encoder and tokenizer (pooled text), a tiny
    T5 encoder with its fast tokenizer (the prompt's tokens), the transformer and VAE above, FLUX-dev's
    FlowMatchEulerDiscreteScheduler (dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_src"))
    tokenizer_2 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "_tokenizer_2_src"))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=make_tiny_flux_vae(seed + 1),
        text_encoder=make_tiny_flux_clip(seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=make_tiny_t5(len(tokenizer_2), seed + 4),
        tokenizer_2=tokenizer_2,
        transformer=make_tiny_flux_transformer(seed + 3),
    )
    pipe.save_pretrained(folder)
    _replace_tokenizer(folder / "tokenizer")
    for name in ("_tokenizer_src", "_tokenizer_2_src"):
        _remove(folder / name)
    return folder


def flux_with_text_encoders(base: str | Path, folder: str | Path) -> Path:
    """A FLUX pipeline folder from a golden's text-encoder-less ``base`` (its transformer, VAE and scheduler): the
    tiny CLIP (pooled width 16) and T5 (the transformer's joint attention width) with their tokenizers added."""
    from transformers import T5TokenizerFast

    base, folder = Path(base), Path(folder)
    for part in ("transformer", "vae", "scheduler"):
        shutil.copytree(base / part, folder / part)
    transformer = json.loads((base / "transformer" / "config.json").read_text())
    make_tiny_flux_clip(0).save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = write_t5_tokenizer(folder / "tokenizer_2")
    t5 = make_tiny_t5(len(T5TokenizerFast.from_pretrained(tokenizer_2)))
    assert t5.config.d_model == transformer["joint_attention_dim"]
    t5.save_pretrained(folder / "text_encoder_2")
    index = json.loads((base / "model_index.json").read_text())
    index.update(
        text_encoder=["transformers", "CLIPTextModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
        text_encoder_2=["transformers", "T5EncoderModel"],
        tokenizer_2=["transformers", "T5TokenizerFast"],
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@_own_random_numbers
def build_infiniteyou(base: str | Path, folder: str | Path, seed: int = 0) -> Path:
    """A tiny InfiniteYou for the tiny FLUX model in ``base``, in the released layout: ``folder/infu_flux_v1.0/
    {aes_stage2,sim_stage1}/`` each with ``image_proj_model.bin`` (``{"image_proj": Resampler}``: 512-d embeddings
    into 8 tokens of the text width) and ``InfuseNetModel/`` (a FluxControlNetModel of 2 double and 2 single blocks
    from the transformer, its zero-initialised output layers made random so that it acts). The two sets differ."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    from faceid.projection import ImageResampler, PerceiverConfig

    base, folder = Path(base), Path(folder)
    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer")
    for k, model_set in enumerate(("aes_stage2", "sim_stage1")):
        target = folder / "infu_flux_v1.0" / model_set
        torch.manual_seed(seed + k)
        resampler = ImageResampler(
            64, PerceiverConfig(clip_dim=512, depth=2), 8, transformer.config.joint_attention_dim
        )
        target.mkdir(parents=True, exist_ok=True)
        state = {"image_proj": {key: v.detach().clone() for key, v in resampler.state_dict().items()}}
        torch.save(state, target / "image_proj_model.bin")
        infusenet = FluxControlNetModel.from_transformer(
            transformer, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2
        )
        generator = torch.Generator().manual_seed(seed + 10 + k)
        with torch.no_grad():
            for layer in [
                *infusenet.controlnet_blocks,
                *infusenet.controlnet_single_blocks,
                infusenet.controlnet_x_embedder,
            ]:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)
        infusenet.save_pretrained(target / "InfuseNetModel")
        config = target / "InfuseNetModel" / "config.json"  # from_transformer copies these; not a ControlNet's
        values = json.loads(config.read_text())
        for key in ("out_channels", "_name_or_path"):
            values.pop(key, None)
        config.write_text(json.dumps(values, indent=2))
    return folder


TINY_EVA = {
    "image_size": 28,
    "patch_size": 14,
    "width": 64,
    "depth": 21,
    "heads": 1,
    "mlp_hidden": 170,
    "embed_dim": 32,
}
"""A tiny EVA02-CLIP tower: 2x2 patches of 14, one head of the released 64, the fewest blocks (21) that give
PuLID's 5 hidden states."""
TINY_PARSER_BASE = 8  # BiSeNet's widths are multiples of 64 released: 8 keeps the tests' 512 crops fast


@_own_random_numbers
def build_pulid(base: str | Path, folder: str | Path, seed: int = 0) -> Path:
    """A tiny PuLID v1.1 for the tiny SDXL model in ``base``, in one folder of the released files:
    ``pulid_v1.1.safetensors`` (``id_adapter.*``: an IDFormer reading the tiny EVA tower, 5 id tokens, 8 queries
    of the UNet's width; ``id_adapter_attn_layers.{i}``: ``id_to_k``/``id_to_v`` per cross-attention processor),
    ``EVA02_CLIP_L_336_psz14_s6B.pt`` (the tower as the EVA-CLIP file lays it out, ``visual.*``, with a stand-in
    text entry) and ``parsing_bisenet.pth`` (BiSeNet at an eighth of its released widths). Random weights that
    act."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from faceid.methods.pulid import IDFormerConfig, PuLIDSDXL, cross_attention_names

    base, folder = Path(base), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    write_pulid_face_files(folder, seed)
    width = unet.config.cross_attention_dim
    config = IDFormerConfig(
        dim=64, depth=5, heads=1, num_id_token=5, num_queries=8, output_dim=width, ff_mult=2,
        eva_width=TINY_EVA["width"], mapping_width=TINY_EVA["width"], id_cond_dim=512 + TINY_EVA["embed_dim"],
    )  # fmt: skip
    layers = {}
    for index, name in cross_attention_names(unet):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        layers[index] = (name, attn.to_k.out_features, attn.to_k.in_features)
    pulid = PuLIDSDXL(config, layers)
    save_file(
        {k: v.detach().contiguous() for k, v in pulid.state_dict().items()}, str(folder / "pulid_v1.1.safetensors")
    )
    return folder


def write_pulid_face_files(folder: Path, seed: int) -> None:
    """PuLID's face side in ``folder`` (both versions read it): the tiny EVA tower as ``EVA02_CLIP_L_336_psz14_s6B.pt``
    lays it out (``visual.*``, with a stand-in text entry) and BiSeNet at an eighth of its widths."""
    from faceid.methods.pulid_face import EVA_CLIP_FILE, PARSING_FILE, BiSeNet, EVAVisionConfig, EVAVisionTower

    torch.manual_seed(seed)
    eva = EVAVisionTower(EVAVisionConfig(**TINY_EVA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero inits (CLS, positions, q/v biases) get values, so they act
        for param in eva.parameters():
            if not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    state = {f"visual.{k}": v for k, v in eva.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)  # the text tower's side of the file, which PuLID does not read
    torch.save(state, folder / EVA_CLIP_FILE)
    torch.save(BiSeNet(base=TINY_PARSER_BASE).state_dict(), folder / PARSING_FILE)


@_own_random_numbers
def build_pulid_flux(base: str | Path, folder: str | Path, seed: int = 0) -> Path:
    """A tiny PuLID-FLUX v0.9.1 for the tiny FLUX model in ``base``, in one folder of the released files:
    ``pulid_flux_v0.9.1.safetensors`` (``pulid_encoder.*``: an IDFormer reading the tiny EVA tower, 5 id tokens, 8
    queries of width 64; ``pulid_ca.{k}``: one cross-attention module per place the released intervals give this
    transformer's blocks, of its width), and the face side as ``build_pulid`` writes it. Random weights that act."""
    from safetensors.torch import save_file

    from faceid.methods.pulid import CHECKPOINT_FLUX, IDFormerConfig, PuLIDFlux, flux_ca_positions

    base, folder = Path(base), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_pulid_face_files(folder, seed)
    transformer = json.loads((base / "transformer" / "config.json").read_text())
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    double, single = flux_ca_positions(transformer["num_layers"], transformer["num_single_layers"])
    count = 1 + max(k for k in double + single if k is not None)
    config = IDFormerConfig(
        dim=64, depth=5, heads=1, num_id_token=5, num_queries=8, output_dim=64, ff_mult=2,
        eva_width=TINY_EVA["width"], mapping_width=TINY_EVA["width"], id_cond_dim=512 + TINY_EVA["embed_dim"],
    )  # fmt: skip
    torch.manual_seed(seed + 1)
    adapter = PuLIDFlux(config, count, dim=width, kv_dim=config.output_dim, heads=1)
    save_file({k: v.detach().contiguous() for k, v in adapter.state_dict().items()}, str(folder / CHECKPOINT_FLUX))
    return folder
