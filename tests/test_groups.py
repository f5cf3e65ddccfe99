"""Token groups: several people in one picture and style references through one attention processor.

The processor adds each group (an identity's FaceID tokens, a reference image's IP-Adapter tokens) with its
own scale, region and window; these tests check that regions keep people apart, that zero weights are the
plain UNet bit for bit, and that FaceID with a plain IP-Adapter stacked is what diffusers computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from PIL import Image
from tiny_models import adapter_state, unet_inputs

from faceid.adapter import FaceIDAdapter
from faceid.attention import TokenGroup, _downsample_mask
from faceid.errors import CheckpointError, FaceIDError
from faceid.groups import Reference, auto_layout, columns_from_faces, region_mask
from faceid.references import ReferenceSpec

SIZE = {"width": 32, "height": 32, "num_inference_steps": 3, "guidance_scale": 7.5, "output_type": "np"}


def _unit(seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def style_image(faces_dir) -> Image.Image:
    return Image.open(faces_dir / "obama2.jpg").convert("RGB")


@pytest.fixture(scope="module")
def styled_pipe(tiny_models, analyzer):
    """The tiny SD1.5 FaceID pipeline with the tiny plain and Plus IP-Adapters loaded next to it."""
    from faceid.pipeline import FaceIDPipeline

    pipe = FaceIDPipeline.from_pretrained(
        tiny_models.sd15, tiny_models.adapter("faceid", "bin"), device="cpu", progress=False, face_analyzer=analyzer
    )
    assert pipe.load_reference(tiny_models.reference("plain"), image_encoder=tiny_models.image_encoder) == (
        "ip-adapter-plain_sd15"
    )
    pipe.load_reference(tiny_models.reference("plus"), name="plus")
    return pipe


# ---------------------------------------------------------------------- the processor
@torch.no_grad()
def test_two_masked_identities_leave_each_others_region_alone():
    """Inside region A (where B's mask, brought to the layer's resolution, is 0) the attention output does
    not change when identity B's tokens change, and the reverse; outside, it does."""
    unet = make_tiny_unet()
    adapter = FaceIDAdapter.install(unet, adapter_state(unet, "faceid"))
    path, processor = next(iter(adapter.processors.items()))
    attn = unet.get_submodule(path)
    generator = torch.Generator().manual_seed(3)
    batch, side, cad = 2, 8, unet.config.cross_attention_dim
    hidden = torch.randn(batch, side * side, attn.to_q.in_features, generator=generator)
    context = torch.randn(batch, 77, cad, generator=generator)
    masks = {"a": region_mask((0, 0, 0.5, 1), 32, 32), "b": region_mask((0.5, 0, 1, 1), 32, 32)}

    def tokens():
        return torch.randn(batch, 4, cad, generator=generator)

    def run(a, b):
        groups = [TokenGroup(a, "faceid", mask=masks["a"]), TokenGroup(b, "faceid", mask=masks["b"])]
        return processor(attn, hidden, context, ip_hidden_states=groups)

    a, b = tokens(), tokens()
    before = run(a, b)
    for changed, other in (("b", run(a, tokens())), ("a", run(tokens(), b))):
        outside = (_downsample_mask(masks[changed], batch, side * side)[..., 0] == 0).expand(batch, -1)
        assert outside[0].float().mean() > 0.35  # most of the other half: bicubic spills over the edge a little
        assert torch.equal(before[outside], other[outside])
        assert not torch.allclose(before[~outside], other[~outside])


@torch.no_grad()
def test_no_groups_or_zero_scales_are_the_plain_unet_bit_for_bit():
    unet = make_tiny_unet()
    inputs, tokens = unet_inputs(unet)
    plain = unet(**inputs).sample
    adapter = FaceIDAdapter.install(unet, adapter_state(unet, "faceid"))
    mask = region_mask((0.25, 0, 1, 1), 24, 16)
    adapter.set_lora_scale(0.0)  # the identity LoRA off: the groups alone
    for groups in ([], [TokenGroup(tokens, "faceid", 0.0), TokenGroup(tokens * 2, "faceid", [0.0, 0.0], mask)]):
        out = unet(**inputs, cross_attention_kwargs={"ip_hidden_states": groups}).sample
        assert torch.equal(out, plain)
    shut = TokenGroup(tokens, "faceid", 0.7)
    shut.set_open(False)
    assert torch.equal(unet(**inputs, cross_attention_kwargs={"ip_hidden_states": [shut]}).sample, plain)
    shut.set_open(True)
    assert not torch.equal(unet(**inputs, cross_attention_kwargs={"ip_hidden_states": [shut]}).sample, plain)
    # One group without a mask is the plain tensor path.
    as_tensor = unet(**inputs, cross_attention_kwargs={"ip_hidden_states": tokens}).sample
    as_group = unet(**inputs, cross_attention_kwargs={"ip_hidden_states": [TokenGroup(tokens, "faceid")]}).sample
    assert torch.equal(as_tensor, as_group)
    with pytest.raises(FaceIDError, match="not loaded on this UNet"):
        unet(**inputs, cross_attention_kwargs={"ip_hidden_states": [TokenGroup(tokens, "style")]})


# ---------------------------------------------------------------------- against diffusers
@pytest.mark.parametrize(
    ("kind", "masked"), [("plain", False), ("plain", True), ("plus", True)], ids=["whole", "masked", "plus-masked"]
)
def test_faceid_with_an_ip_adapter_equals_diffusers(styled_pipe, tiny_models, style_image, kind, masked):
    """FaceID plus a standard IP-Adapter (scale 0.5), with and without a region each, is what diffusers'
    ``load_ip_adapter([faceid, ip-adapter])`` computes with the same weights and ``ip_adapter_masks``."""
    from diffusers import StableDiffusionPipeline

    face_box, style_box = (0.0, 0.0, 0.5, 1.0), (0.25, 0.0, 1.0, 1.0)
    embedding = _unit(0)
    name = "ip-adapter-plain_sd15" if kind == "plain" else "plus"
    reference = Reference(style_image, 0.5, adapter=name, region=style_box if masked else None)
    conditioning = styled_pipe.encode(
        "a photo of a person", embedding, regions=[face_box] if masked else None, style=[reference]
    )
    mine = styled_pipe(conditioning=conditioning, seed=1, **SIZE).images

    theirs = StableDiffusionPipeline.from_pretrained(tiny_models.sd15, safety_checker=None)
    theirs.scheduler = type(styled_pipe.pipe.scheduler).from_config(styled_pipe.pipe.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    faceid, other_file = tiny_models.adapter("faceid", "bin"), tiny_models.reference(kind)
    theirs.load_ip_adapter(
        [str(faceid.parent), str(other_file.parent)],
        subfolder=["", ""],
        weight_name=[faceid.name, other_file.name],
        image_encoder_folder=None,
    )
    theirs.set_ip_adapter_scale([1.0, 0.5])
    _, clip, clip_uncond = styled_pipe.reference_encoder.features([style_image], penultimate=kind == "plus")
    embeds = [torch.cat([torch.zeros_like(embedding), embedding])[:, None], torch.cat([clip_uncond, clip])[:, None]]
    extra = {}
    if masked:
        masks = [region_mask(box, SIZE["width"], SIZE["height"])[None] for box in (face_box, style_box)]
        extra["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
    text = conditioning.pipe_kwargs
    other = theirs(
        prompt_embeds=text["prompt_embeds"],
        negative_prompt_embeds=text["negative_prompt_embeds"],
        ip_adapter_image_embeds=embeds,
        generator=torch.Generator().manual_seed(1),
        **SIZE,
        **extra,
    ).images
    print(f"\nmax |faceid - diffusers| ({kind}, {'masked' if masked else 'whole'}) = {np.abs(mine - other).max():.2e}")
    np.testing.assert_allclose(mine, other, atol=1e-4)
    without = styled_pipe(conditioning=styled_pipe.encode("a photo of a person", embedding), seed=1, **SIZE).images
    assert np.abs(mine - without).max() > 1e-3  # the reference acts
    if masked:  # and the regions do
        whole = styled_pipe("a photo of a person", embedding, style=[Reference(style_image, 0.5, name)], seed=1, **SIZE)
        assert np.abs(mine - whole.images).max() > 1e-3


# ---------------------------------------------------------------------- references in the pipeline
def test_a_reference_acts_in_its_window_only_and_is_recorded(styled_pipe, style_image):
    embedding = _unit(1)
    plain = styled_pipe("a photo of a person", embedding, seed=2, **SIZE)
    off = styled_pipe(
        "a photo of a person", embedding, seed=2, style=[Reference(style_image, 0.8, "plus", (0, 0))], **SIZE
    )
    assert np.array_equal(off.images, plain.images)  # an empty window: bit for bit no reference
    late = styled_pipe(
        "a photo of a person", embedding, seed=2, style=[Reference(style_image, 0.8, "plus", (0.5, 1))], **SIZE
    )
    full = styled_pipe("a photo of a person", embedding, seed=2, style=[Reference(style_image, 0.8, "plus")], **SIZE)
    assert len({plain.images.tobytes(), late.images.tobytes(), full.images.tobytes()}) == 3
    style = full.settings.style
    assert [(s.adapter, s.scale, s.window) for s in style] == [("plus", 0.8, None)]
    with pytest.raises(FaceIDError, match="give their images with style="):
        styled_pipe("a photo of a person", embedding, settings=full.settings, **SIZE)
    with pytest.raises(FaceIDError, match="several are loaded"):
        styled_pipe("a photo of a person", embedding, style=[style_image], **SIZE)


def test_reference_checkpoints_are_read_off_their_tensors(tiny_models, styled_pipe):
    from faceid.checkpoints import load_state_dict

    plain = ReferenceSpec.from_state_dict(load_state_dict(tiny_models.reference("plain")), "plain")
    plus = ReferenceSpec.from_state_dict(load_state_dict(tiny_models.reference("plus")), "plus")
    assert (plain.kind, plain.num_tokens, plain.clip_dim, plain.penultimate) == ("plain", 4, 24, False)
    assert (plus.kind, plus.num_tokens, plus.clip_dim, plus.penultimate) == ("plus", 4, 48, True)
    with pytest.raises(CheckpointError, match="IP-Adapter-FaceID checkpoint"):
        styled_pipe.load_reference(tiny_models.adapter("faceid", "bin"), name="oops")
    with pytest.raises(CheckpointError, match="does not fit this base model"):
        styled_pipe.load_reference(tiny_models.reference("plain", "sdxl"), name="xl")
    assert set(styled_pipe.references) == {"ip-adapter-plain_sd15", "plus"}


# ---------------------------------------------------------------------- several people
def test_regions_layouts():
    assert auto_layout(2) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    columns = columns_from_faces([[300, 10, 380, 90], [20, 10, 100, 90]], 400, 2)
    assert columns == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]  # sorted left to right, cut between them
    with pytest.raises(FaceIDError, match="2 people to place but 1 face"):
        columns_from_faces([[0, 0, 10, 10]], 100, 2)
    mask = region_mask((0.25, 0.0, 0.75, 0.5), 8, 4)
    assert mask.shape == (1, 4, 8) and mask.sum() == 8 and mask[0, 0, 2:6].eq(1).all()
    with pytest.raises(FaceIDError, match="not a box"):
        region_mask((0.5, 0, 0.4, 1), 8, 8)


def test_two_people_in_one_picture_from_a_photo_pair(styled_pipe, faces_dir):
    """Two real photos, two people in every image: the faces of a two-person photo give their columns; each
    person acts in their own region, and swapping them changes the picture."""
    obama, biden = (Image.open(faces_dir / name).convert("RGB") for name in ("obama.jpg", "biden.jpg"))
    pair = Image.new("RGB", (obama.width + biden.width, max(obama.height, biden.height)), "white")
    pair.paste(obama, (0, 0))
    pair.paste(biden, (obama.width, 0))
    result = styled_pipe("two people", face=[obama, biden], regions=pair, seed=[3, 4], num_images_per_prompt=2, **SIZE)
    assert result.images.shape == (2, 32, 32, 3)
    cut = result.settings.regions[0][2]
    assert abs(cut - obama.width / pair.width) < 0.2 and result.settings.regions[1][2] == 1.0
    assert len(result.faces) == 1 and len(result.faces[0]) == 2  # one prompt, its two people
    swapped = styled_pipe("two people", face=[biden, obama], regions=result.settings.regions, seed=3, **SIZE)
    again = styled_pipe("two people", face=[obama, biden], settings=result.settings.for_image(0), output_type="np")
    np.testing.assert_allclose(again.images[0], result.images[0], atol=1e-5)  # the recorded boxes reproduce it
    assert not np.array_equal(swapped.images[0], result.images[0])
    with pytest.raises(FaceIDError, match="3 regions for 2 people"):
        styled_pipe("two people", face=[obama, biden], regions=auto_layout(3), **SIZE)


def test_people_and_references_run_in_parts_and_with_identity_guidance(styled_pipe, faces_dir, style_image):
    """The groups go through a batch split in parts (image i as in the whole batch) and identity guidance
    (each person's own null tokens in the extra entry)."""
    people = [_unit(4), _unit(5)]
    common = {"regions": "auto", "style": [Reference(style_image, 0.6, "plus")], "seed": [7, 8], **SIZE}
    whole = styled_pipe("two people", people, num_images_per_prompt=2, **common).images
    parts = styled_pipe("two people", people, num_images_per_prompt=2, max_batch=1, **common).images
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    guided = styled_pipe("two people", people, num_images_per_prompt=2, identity_guidance=2.0, **common).images
    assert np.abs(guided - whole).max() > 1e-3
    zero = styled_pipe("two people", people, num_images_per_prompt=2, identity_guidance=0.0, **common).images
    assert np.array_equal(zero, whole)


def test_two_people_on_sdxl(tiny_models):
    from faceid.pipeline import FaceIDPipeline

    pipe = FaceIDPipeline.from_pretrained(
        tiny_models.sdxl, tiny_models.adapter("faceid-sdxl"), device="cpu", progress=False
    )
    sizes = {**SIZE, "guidance_scale": 5.0}
    one = pipe("two people", [_unit(6), _unit(7)], regions="auto", seed=1, **sizes).images
    other = pipe("two people", [_unit(7), _unit(6)], regions="auto", seed=1, **sizes).images
    assert one.shape == (1, 32, 32, 3) and np.abs(one - other).max() > 1e-4
