"""The user's own FLUX ControlNets on a FLUX.1 model set (``control=[ControlInput(image, flux_controlnet, scale,
window)]``): with PuLID-FLUX (the family's ControlNet pipeline with the user's net) and beside InfiniteYou's
InfuseNet (one per-call ``InfuseNetCall`` holding InfuseNet and the user's nets, each net's residuals expanded to
one per transformer block by the transformer's own rule and summed).

Checked: expanding a residual list to one entry per block changes nothing the transformer computes (bit for bit);
a PuLID-FLUX call with a net equals diffusers' stock ``FluxControlNetPipeline`` with that net and the identity given
by hand; beside InfuseNet, a call with a net of another depth in a window equals a hand-made reference (the
residuals expanded and summed by explicit index arithmetic, run by the stock pipeline), the net acts, and at scale
0 or in a window that opens at no step the call is InfiniteYou alone bit for bit; an XLabs-style net (input hint
block) beside InfuseNet is refused; the CLI's ``--control KIND:IMAGE --controlnet FOLDER`` with InfiniteYou.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxTransformer2DModel
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel
from face_helpers import face_photo
from PIL import Image
from tiny_models import build_infiniteyou, build_pulid_flux

from faceid.cli import main
from faceid.errors import FaceIDError
from faceid.faces.irse50 import IRSE50, IRSE50_FILE
from faceid.methods.infiniteyou import control_image, infusenet_residuals, per_block
from faceid.methods.pulid import PuLIDIdentity
from faceid.modes import ControlInput
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 32, "height": 32}
RUN = {**SIZE, "num_inference_steps": 2, "output_type": "np"}
PROMPT = "a photo of a person"
EMBEDDING = np.random.default_rng(3).standard_normal(512).astype(np.float32)
# The pipeline's VAE samples each control image from the call's generator before it draws the noise, so a call with
# one more control image draws other noise: calls compared with and without a net start from the same latents (FLUX's
# packed latents: one token of 4 x 16 channels per 2x2 latent pixels).


@pytest.fixture(scope="module")
def latents(pipe):
    side = SIZE["width"] // (2 * pipe.pipe.vae_scale_factor)
    channels = pipe.pipe.transformer.config.in_channels
    return torch.randn(1, side * side, channels, generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def infiniteyou_dir(flux_dir, tmp_path_factory):
    """The release's layout, with a random IR-SE of one bottleneck per stage as facexlib's recognizer (the CLI embeds
    the face photo with it)."""
    folder = build_infiniteyou(flux_dir, tmp_path_factory.mktemp("infiniteyou") / "InfiniteYou", seed=2)
    torch.manual_seed(4)
    torch.save(IRSE50((1, 1, 1, 1)).state_dict(), folder / IRSE50_FILE)
    return folder


@pytest.fixture(scope="module")
def pipe(flux_dir, infiniteyou_dir, tmp_path_factory, both_packs):
    pulid = build_pulid_flux(flux_dir, tmp_path_factory.mktemp("pulid-flux") / "PuLID", seed=3)
    return FaceIDPipeline.from_pretrained(
        flux_dir,
        None,
        methods={"infiniteyou": infiniteyou_dir, "pulid-flux": pulid},
        device="cpu",
        progress=False,
        face_models=both_packs,
    )


def make_flux_controlnet(transformer, seed, double=1, single=3, **kwargs):
    """A tiny FLUX ControlNet of the set's transformer, of another depth than InfuseNet (2 and 2), its zero-
    initialised output layers made random so that it acts."""
    net = FluxControlNetModel.from_transformer(
        transformer, num_layers=double, num_single_layers=single, attention_head_dim=16, num_attention_heads=2, **kwargs
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.1)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net(pipe):
    return make_flux_controlnet(pipe.pipe.transformer, 11)


def _picture(seed, size=(32, 32)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _stock(pipe, controlnet):
    scheduler = type(pipe.pipe.scheduler).from_config(pipe.pipe.scheduler.config)
    stock = FluxControlNetPipeline(**{**pipe.pipe.components, "scheduler": scheduler, "controlnet": controlnet})
    stock.set_progress_bar_config(disable=True)
    return stock


def _prompt(pipe):
    embeds, pooled, _ = pipe.pipe.encode_prompt(
        [PROMPT], prompt_2=None, device="cpu", max_sequence_length=pipe.pipe.tokenizer_2.model_max_length
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


# ---------------------------------------------------------------------- the expansion
def test_one_residual_per_block_is_what_the_transformer_adds_anyway(pipe):
    """The transformer maps n residuals onto its blocks by interval ceil(blocks / n); given the expanded list
    (interval 1) it computes the same, bit for bit, for every n."""
    transformer: FluxTransformer2DModel = pipe.pipe.transformer
    double, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    generator = torch.Generator().manual_seed(0)
    tokens, width = 16, transformer.inner_dim
    inputs = {
        "hidden_states": torch.randn(1, tokens, transformer.config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 4, transformer.config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "txt_ids": torch.zeros(4, 3),
        "img_ids": torch.zeros(tokens, 3),
        "return_dict": False,
    }
    for n_double, n_single in [(1, 1), (2, 2), (double, 3), (2, single)]:
        blocks = [torch.randn(1, tokens, width, generator=generator) for _ in range(n_double)]
        singles = [torch.randn(1, tokens, width, generator=generator) for _ in range(n_single)]
        with torch.no_grad():
            raw = transformer(**inputs, controlnet_block_samples=blocks, controlnet_single_block_samples=singles)[0]
            expanded = transformer(
                **inputs,
                controlnet_block_samples=per_block(blocks, double),
                controlnet_single_block_samples=per_block(singles, single),
            )[0]
        torch.testing.assert_close(expanded, raw, atol=0, rtol=0)
    assert per_block(["a", "b"], 3) == ["a", "a", "b"] and per_block(["a", "b", "c"], 5) == ["a", "a", "b", "b", "c"]
    assert per_block(["a", "b"], 5, repeat=True) == ["a", "b", "a", "b", "a"] and per_block(None, 3) == []


# ---------------------------------------------------------------------- with PuLID-FLUX
def test_pulid_flux_with_a_controlnet_is_the_stock_flux_controlnet_pipeline(pipe, net):
    photo = face_photo("obama.jpg")
    image = _picture(1)
    mine = pipe(PROMPT, photo, method="pulid-flux", scale=0.7, control=ControlInput(image, net, 0.8), seed=3, **RUN)
    encoded = pipe.encode(PROMPT, photo, method="pulid-flux")
    stock = _stock(pipe, net)(
        prompt_embeds=encoded.pipe_kwargs["prompt_embeds"],
        pooled_prompt_embeds=encoded.pipe_kwargs["pooled_prompt_embeds"],
        joint_attention_kwargs={"pulid": PuLIDIdentity(encoded.identity, 0.7)},
        control_image=image,
        controlnet_conditioning_scale=0.8,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(3),
        **RUN,
    ).images
    difference = float(np.abs(mine.images - stock).max())
    print(f"PuLID-FLUX + ControlNet vs stock FluxControlNetPipeline: max |difference| {difference:.3g}")
    assert difference <= 1e-6, difference
    without = pipe(PROMPT, photo, method="pulid-flux", scale=0.7, seed=3, **RUN).images
    assert np.abs(mine.images - without).max() > 1e-3  # the net acts


# ---------------------------------------------------------------------- beside InfuseNet
class ExpandedSum(FluxMultiControlNetModel):
    """The hand-made reference: InfuseNet on the identity tokens, the user's net on the prompt, each residual list
    spread over the transformer's blocks by explicit index arithmetic and added."""

    def __init__(self, infusenet, user_net, tokens, double, single):
        super().__init__([infusenet, user_net])
        self.tokens, self.double, self.single = tokens, double, single

    def forward(self, hidden_states, controlnet_cond, controlnet_mode, conditioning_scale, **kwargs):
        infused = infusenet_residuals(
            self.nets[0],
            hidden_states=hidden_states,
            controlnet_cond=controlnet_cond[0],
            conditioning_scale=conditioning_scale[0],
            timestep=kwargs["timestep"],
            pooled_projections=kwargs["pooled_projections"],
            img_ids=kwargs["img_ids"],
            id_tokens=self.tokens,
        )
        batch = hidden_states.shape[0]
        user = self.nets[1](
            hidden_states=hidden_states,
            controlnet_cond=controlnet_cond[1],
            conditioning_scale=conditioning_scale[1],
            timestep=kwargs["timestep"],
            guidance=torch.full((batch,), 3.5),
            pooled_projections=kwargs["pooled_projections"],
            encoder_hidden_states=kwargs["encoder_hidden_states"],
            txt_ids=kwargs["txt_ids"],
            img_ids=kwargs["img_ids"],
            return_dict=False,
        )

        def spread(a, b, blocks):
            ia, ib = math.ceil(blocks / len(a)), math.ceil(blocks / len(b))
            return [a[i // ia] + b[i // ib] for i in range(blocks)]

        return spread(infused[0], user[0], self.double), spread(infused[1], user[1], self.single)


def test_beside_infusenet_a_net_of_another_depth_in_a_window_is_the_expanded_sum(pipe, net, latents):
    image = _picture(1)
    control = ControlInput(image, net, 0.8, window=(0.5, 1.0))  # the second of 2 steps
    mine = pipe(PROMPT, EMBEDDING, control=control, seed=5, latents=latents, **RUN).images
    loaded = pipe.methods["infiniteyou"]
    transformer = pipe.pipe.transformer
    assert len(net.controlnet_blocks) != len(loaded.infusenet.controlnet_blocks)  # diffusers' zip would misalign
    reference = ExpandedSum(
        loaded.infusenet,
        net,
        loaded.identity_tokens(EMBEDDING),
        len(transformer.transformer_blocks),
        len(transformer.single_transformer_blocks),
    )
    expected = _stock(pipe, reference)(
        **_prompt(pipe),
        control_image=[control_image((32, 32)), image],
        controlnet_conditioning_scale=[1.0, 0.8],
        control_guidance_start=[0.0, 0.5],
        control_guidance_end=[1.0, 1.0],
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(5),
        latents=latents,
        **RUN,
    ).images
    difference = float(np.abs(mine - expected).max())
    print(f"InfiniteYou + ControlNet vs the hand-made expanded sum: max |difference| {difference:.3g}")
    assert difference <= 1e-6, difference
    alone = pipe(PROMPT, EMBEDDING, seed=5, latents=latents, **RUN).images
    assert np.abs(mine - alone).max() > 1e-3  # the net acts in its window
    everywhere = pipe(PROMPT, EMBEDDING, control=ControlInput(image, net, 0.8), seed=5, latents=latents, **RUN).images
    assert np.abs(mine - everywhere).max() > 1e-3  # and the window shuts it in the first step


def test_at_scale_0_or_outside_its_window_the_net_leaves_infiniteyou_alone_bit_for_bit(pipe, net, latents):
    alone = pipe(PROMPT, EMBEDDING, seed=5, latents=latents, **RUN).images
    second = make_flux_controlnet(pipe.pipe.transformer, 12, double=3, single=1)
    for controls in (
        [ControlInput(_picture(2), net, 0.0)],
        [ControlInput(_picture(2), net, 0.9, window=(0.0, 0.4)), ControlInput(_picture(3), second, 0.0)],
    ):
        # (0, 0.4) of 2 steps: step 0 ends at 0.5 > 0.4, step 1 starts at 0.5: no step
        result = pipe(PROMPT, EMBEDDING, control=controls, seed=5, latents=latents, **RUN).images
        np.testing.assert_array_equal(result, alone)


def test_an_xlabs_net_beside_infusenet_is_refused(pipe):
    config = {**pipe.pipe.transformer.config, "num_layers": 1, "num_single_layers": 1}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("out_channels",)}
    xlabs = FluxControlNetModel(**config, conditioning_embedding_channels=16)
    assert xlabs.input_hint_block is not None
    with pytest.raises(FaceIDError, match="XLabs-style FLUX ControlNet .*InstantX-style"):
        pipe(PROMPT, EMBEDDING, control=ControlInput(_picture(1), xlabs), **RUN)


def test_the_cli(pipe, net, flux_dir, infiniteyou_dir, both_packs, tmp_path, capsys):
    """``--control image:IMAGE --controlnet FOLDER`` with ``--method infiniteyou``: the image is the call's."""
    folder = tmp_path / "flux-controlnet"
    net.save_pretrained(folder)
    control = tmp_path / "control.png"
    _picture(4).save(control)
    photo = face_photo("obama.jpg")
    out = tmp_path / "out"
    argv = ["generate", "--face", str(photo), "--prompt", PROMPT, "--out", str(out), "--base-model", str(flux_dir),
            "--face-models", str(both_packs), "--steps", "2", "-n", "1", "--seed", "3", "--width", "32", "--height",
            "32", "--device", "cpu", "--method", "infiniteyou", "--method-weights", f"infiniteyou={infiniteyou_dir}",
            "--control", f"image:{control}:0.8", "--controlnet", str(folder)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    made = np.asarray(Image.open(out / "obama_s3.png").convert("RGB")).astype(float)
    without = tmp_path / "without"
    assert main([*argv[: argv.index("--control")], "--out", str(without)]) == 0  # the last --out counts
    alone = np.asarray(Image.open(without / "obama_s3.png").convert("RGB")).astype(float)
    assert np.abs(made - alone).max() > 2  # the net acted


def test_several_nets_of_different_depths_are_refused_without_infusenet(pipe, net):
    """Without InfuseNet, diffusers' FluxMultiControlNetModel runs several nets: it zips their residual lists, so
    nets of different depths are refused (beside InfuseNet they are summed per block, above)."""
    deeper = make_flux_controlnet(pipe.pipe.transformer, 14, double=2, single=3)
    controls = [ControlInput(_picture(1), net, 0.5), ControlInput(_picture(2), deeper, 0.5)]
    with pytest.raises(FaceIDError, match="differ in depth"):
        pipe(PROMPT, face_photo("obama.jpg"), method="pulid-flux", control=controls, **RUN)
