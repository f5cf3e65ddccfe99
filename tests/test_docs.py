"""The documentation runs: every example of ``README.md`` and ``docs/*.md``, on the tests' tiny models, offline.

The convention (the pages follow it; ``docs/TESTING.md`` says it in short):

* **Which blocks run.** Fenced ``python`` blocks run in the order of the page, all in one namespace per page (an
  example may use what an earlier one made). Fenced ``bash`` blocks run command by command (a command is one line,
  or several joined by a trailing ``\\`` or by a quoted string that goes on): ``faceid ARGS`` and ``./run.sh ARGS``
  through ``faceid.cli.main(ARGS)`` in this process (``./run.sh`` only adds the set-up; ``./run.sh test`` is not
  run, since it runs this suite: it is counted as skipped, and run.sh is checked to hand ``test`` to pytest), and
  ``curl`` lines as requests to the server that the page's latest ``faceid serve`` line started. Any other command
  in a block that runs is an error: mark the block. ``text``, ``json`` and unlabelled blocks are not examples.
* **Markers.** An HTML comment on the line before a block's fence: ``<!-- not run: REASON -->`` skips the block (the
  reason is counted and printed at the end of the run; keep them few); ``<!-- expect exit N: REASON -->`` expects
  every ``faceid`` command of the block to end with status N (default 0).
* **Servers.** ``faceid serve ...`` runs the real command with ``uvicorn.run`` replaced by a FastAPI TestClient
  around the app it builds (so its flags, model loading and configuration are the CLI's own); the previous server
  of the page waits for its jobs (each must end ``done``) and stops. ``curl`` options: ``-F`` (``@FILE`` uploads),
  ``-H``, ``-d``, ``-X``, ``-u``, ``-o``, ``-N``. A ``# -> ...`` comment (after the command, or on the next line) states the
  response: a leading status (``# -> 202 ...``, ``# -> 204 or 409 ...``) is checked, else any 2xx is expected; an
  id shown as ``"id": "3f2a..."`` is bound to the response's ``id``, and later commands of the page use it where
  they say ``3f2a...``. ``<image-id>`` is the first image of the page's latest generation, once it is done. An
  ``/events`` stream must end with its ``done`` event.
* **What the examples name** is resolved by faceid's own code, as for a user: released names and Hub repo ids
  (``"SG161222/Realistic_Vision_V4.0_noVAE"``, ``adapter="faceid-sd15"``, ``lllyasviel/sd-controlnet-canny``,
  ``openai/clip-vit-large-patch14`` ...) are found in a fake, offline Hugging Face cache (``HF_HUB_CACHE``) that
  holds the tiny models of ``tiny_models.py`` under those names, at the commits faceid pins; faceid's sha256 check
  lets that cache's files through (they are stand-ins, the real hashes cannot match) and checks everything else.
  Three stand-ins go deeper, each because the real architecture does not fit the tiny models or needs the real
  weights: buffalo_l is the tests' face models folder (YuNet + the stand-in recognizer); the released tiny-VAE
  names load a tiny ``AutoencoderTiny`` (the released architecture upsamples 8x, the tiny VAE 2x); OpenPose's body
  network is the stand-in of ``pose_helpers.py``, which "sees" one upright person in a 320x240 photo.
* **Files.** Each page runs in a fresh working directory holding what the examples name: ``me.jpg``,
  ``photo.jpg``, ``alice.jpg``, ``friend.jpg`` ... are copies of the real photos in ``tests/data/faces``; ``party.jpg``
  (and ``group.jpg``, ``friends.jpg``, ``us-two.jpg``) puts two of them side by side; ``dancer.jpg`` is a 320x240
  crop; ``landscape.jpg`` has no face; masks, LoRA files, adapter files and model folders (``rv4``,
  ``buffalo_l``, ``face-models``, ``InstantID`` ...) are the tiny ones (``_workspace``).
* **Cost.** Examples are written as a user would write them (30 default steps, 512x768, ``--width 512``...); the
  harness caps what runs, openly: the family defaults become 3 steps at 32x48 (SD1.5) or 32x32 (SDXL), and in
  ``faceid.plan.request`` a call's requested steps and size are capped at 4 steps and 64 pixels a side (the aspect
  kept), so every call, from Python, the CLI or the server, records the settings that actually ran (and an image
  made again from its PNG is the same image). A face swap generates its crop at 64, its smallest resolution
  (``faceid.swap.plan_swap``, and the default the service resolves a swap request's resolution to).
* **Checks.** Besides "it ran": the ``faceid`` and ``curl`` statuses, the ``assert`` lines of the examples, and per
  page (``CHECKS``) the files and values the examples imply (images written, a PNG's settings reproducing it, an
  image made again being the same). ``test_links`` checks every relative link and anchor of the pages,
  ``test_architecture_lists_every_module`` the layout in docs/ARCHITECTURE.md against ``src/faceid``, and
  ``test_testing_lists_every_test_file`` the test list in docs/TESTING.md against ``tests/``.

At the end of the run one line counts the examples that ran and lists the skipped ones with their reasons;
``FACEID_DOCS_VERBOSE=1`` also shows the examples' own output and the 20 slowest blocks and commands.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SERVER = "http://127.0.0.1:7860"
MAX_SIDE, MAX_STEPS = 64, 4
DEFAULTS = {
    "SD1.5": {"width": 32, "height": 48, "num_inference_steps": 3},
    "SDXL": {"width": 32, "height": 32, "num_inference_steps": 3},
}
SWAP_RESOLUTION = 64  # the smallest a face swap generates at
DEADLINE = 120.0  # seconds a server's jobs may take to finish
FAKE_REVISION = "0" * 40  # the "main" commit of the repositories faceid does not pin

SKIPPED: list[tuple[str, int, str]] = []  # (page, line, reason)
TIMES: list[tuple[float, str]] = []  # (seconds, page:line) of every block that ran
RAN: dict[str, int] = {"python": 0, "faceid": 0, "curl": 0}


# ---------------------------------------------------------------------------------------------- the pages
@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None = None  # "not run: ..." or "expect exit N: ..."


def blocks(page: str) -> list[Block]:
    """The fenced blocks of ``page``, with the marker comment on the line before each."""
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, lang, body = i, fence.group(2), []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][len(fence.group(1)) :])
            i += 1
        before = lines[start - 1].strip() if start else ""
        marker = re.fullmatch(r"<!--\s*(.*?)\s*-->", before)
        found.append(Block(page, start + 1, lang, "\n".join(body), marker.group(1) if marker else None))
        i += 1
    return found


@dataclass
class Command:
    text: str
    line: int
    comment: str = ""  # the "# -> ..." comment, without "# ->"


def _comment_start(text: str) -> int | None:
    """Where the unquoted ``#`` comment of a shell line starts (None: no comment)."""
    quote = None
    for k, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (k == 0 or text[k - 1].isspace()):
            return k
    return None


def commands(block: Block) -> list[Command]:
    """The commands of a bash block (continuation lines joined), each with its ``# ->`` comment."""
    found: list[Command] = []
    pending, first = "", 0
    for offset, raw in enumerate(block.code.splitlines()):
        number = block.line + 1 + offset
        if not pending and raw.strip().startswith("#"):
            if raw.strip().startswith("# ->") and found:
                found[-1].comment = raw.strip()[4:].strip()
            continue
        if not pending and not raw.strip():
            continue
        first = first if pending else number
        cut = _comment_start(raw)
        code, comment = (raw, "") if cut is None else (raw[:cut], raw[cut:])
        if code.rstrip().endswith("\\"):
            pending += code.rstrip()[:-1] + " "
            continue
        pending += code
        try:
            shlex.split(pending)
        except ValueError:  # a quoted string goes on to the next line
            pending += "\n"
            continue
        arrow = comment.strip()[1:].strip() if comment else ""
        found.append(Command(pending.strip(), first, arrow[2:].strip() if arrow.startswith("->") else ""))
        pending = ""
    assert not pending, f"{block.page}:{block.line}: an unfinished command: {pending!r}"
    return found


# ---------------------------------------------------------------------------------------------- the world
def _symlink_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source`` whose files are links to the originals (cheap, read-only use)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.rglob("*"):
        if path.is_file():
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(path)


class FakeHub:
    """A Hugging Face cache (``HF_HUB_CACHE`` layout) in which repo ids hold the tiny models."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def snapshot(self, repo: str, revision: str | None) -> Path:
        folder = self.root / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        if revision is None or not (folder / "refs" / "main").exists():
            (folder / "refs" / "main").write_text(revision or FAKE_REVISION)
        return folder / "snapshots" / (revision or FAKE_REVISION)

    def folder(self, repo: str, source: Path, revision: str | None = None, subfolder: str | None = None) -> None:
        target = self.snapshot(repo, revision)
        _symlink_tree(source, target / subfolder if subfolder else target)

    def file(self, hub_file, source: Path) -> None:
        target = self.snapshot(hub_file.repo, hub_file.revision) / hub_file.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source)

    def holds(self, path) -> bool:
        return str(Path(path).absolute()).startswith(str(self.root))


def _make_controlnet(base: Path, folder: Path, seed: int) -> Path:
    """A ControlNet of a tiny model (``tiny_models.make_controlnet``), saved as a diffusers folder."""
    from tiny_models import make_controlnet

    make_controlnet(base, seed).save_pretrained(folder)
    return folder


def _make_depth_model(folder: Path) -> Path:
    """A random-weight Depth Anything (as tests/test_control.py makes it), saved like the Hub model."""
    import transformers
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            image_size=28, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8],
                                 fusion_hidden_size=8, head_hidden_size=8)  # fmt: skip
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    processor = getattr(transformers, "DPTImageProcessorPil", None) or transformers.DPTImageProcessor
    processor(size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(folder)
    return folder


def _save_lora(unet_folder: Path, path: Path, layout: str, seed: int) -> Path:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from tiny_models import few_step_lora_state

    unet = UNet2DConditionModel.from_pretrained(unet_folder / "unet")
    save_file(few_step_lora_state(unet, layout, seed=seed), str(path))
    return path


@dataclass
class World:
    """Everything the pages' examples need, built once per run: the fake Hub and the files of a workspace."""

    root: Path
    hub: FakeHub
    files: dict[str, Path] = field(default_factory=dict)  # workspace name -> what it is a copy of (or links to)
    folders: dict[str, Path] = field(default_factory=dict)  # workspace folder -> a folder it links to
    face_models: Path | None = None


def _build_world(root: Path, tiny_models, face_models_dir: Path, faces_dir: Path) -> World:
    from conftest import make_tiny_clip
    from diffusers import AutoencoderTiny
    from tiny_models import build_instantid, make_tiny_autoencoder

    from faceid import fast, openpose, references, tiny_vae, variants
    from faceid.depth import DEPTH_MODEL

    hub = FakeHub(root / "hub")
    world = World(root, hub, face_models=face_models_dir)
    sd15, sdxl = tiny_models.sd15, tiny_models.sdxl
    # Base models and VAEs by their Hub ids.
    for repo in ("SG161222/Realistic_Vision_V4.0_noVAE", "runwayml/stable-diffusion-v1-5"):
        hub.folder(repo, sd15)
    hub.folder("SG161222/RealVisXL_V3.0", sdxl)
    hub.folder("stabilityai/sd-vae-ft-mse", sd15 / "vae")
    # The released adapters at the pinned commit: each the tiny adapter of its architecture and family.
    tiny = {("SD1.5", "faceid"): "faceid", ("SD1.5", "plus"): "faceid-plusv2", ("SD1.5", "plusv2"): "faceid-plusv2",
            ("SD1.5", "portrait"): "faceid-portrait", ("SDXL", "faceid"): "faceid-sdxl",
            ("SDXL", "plusv2"): "faceid-plusv2-sdxl"}  # fmt: skip
    for release in variants.VARIANTS.values():
        name = tiny.get((release.family, release.architecture.name))
        if name is not None:
            fmt = "bin" if release.adapter.filename.endswith(".bin") else "safetensors"
            hub.file(release.adapter, tiny_models.adapter(name, fmt))
    hub.folder(variants.CLIP_VIT_H.repo, tiny_models.image_encoder, variants.CLIP_VIT_H.revision,
               variants.CLIP_VIT_H.subfolder)  # fmt: skip
    for kind, files in references.REFERENCE_ADAPTERS.items():
        for family, hub_file in files.items():
            hub.file(
                hub_file, tiny_models.reference("plain" if kind == "plain" else "plus", family.lower().replace(".", ""))
            )
    # Few-step LoRAs (random, in each preset's key layout), the tiny VAEs, ControlNets, OpenPose, depth, CLIP.
    made = root / "made"
    made.mkdir()
    layouts = {"lcm": "kohya", "lightning": "kohya", "hyper": "kohya", "tcd": "diffusers-old"}
    for name, preset in fast.PRESETS.items():
        for family, hub_file in preset.loras.items():
            base = sd15 if family == "SD1.5" else sdxl
            hub.file(hub_file, _save_lora(base, made / f"{name}-{family}.safetensors", layouts[name], seed=7))
    for release in tiny_vae.TINY_VAES.values():
        folder = made / f"tiny-vae-{release.name}"
        make_tiny_autoencoder(folder, seed=3)
        assert isinstance(AutoencoderTiny.from_pretrained(folder), AutoencoderTiny)
        hub.folder(release.file.repo, folder, release.file.revision)
    controlnet = _make_controlnet(sd15, made / "controlnet-sd15", seed=1)
    for repo in ("lllyasviel/control_v11p_sd15_openpose", "lllyasviel/control_v11f1p_sd15_depth",
                 "lllyasviel/sd-controlnet-canny"):  # fmt: skip
        hub.folder(repo, controlnet)
    pose_weights = made / "body_pose_model.pth"
    torch.save({}, pose_weights)  # the stand-in network replaces it (see the module docstring)
    hub.file(openpose.OPENPOSE_BODY, pose_weights)
    hub.folder(DEPTH_MODEL.repo, _make_depth_model(made / "depth"), DEPTH_MODEL.revision)
    clip = make_tiny_clip(made / "clip")
    hub.folder("openai/clip-vit-large-patch14", clip)

    # The workspace: photos (copies of the real ones), masks, small files and model folders.
    obama, obama2, biden = (faces_dir / n for n in ("obama.jpg", "obama2.jpg", "biden.jpg"))
    photos = made / "photos"
    photos.mkdir()
    pair = _side_by_side(obama, biden, photos / "pair.jpg")
    dancer = photos / "dancer.jpg"
    with Image.open(obama) as image:
        image.convert("RGB").resize((320, 240)).save(dancer)
    blank = photos / "landscape.jpg"
    Image.fromarray(np.tile(np.linspace(40, 220, 320, dtype=np.uint8), (240, 1))).convert("RGB").save(blank)
    world.files.update({
        "me.jpg": obama, "me1.jpg": obama, "me2.jpg": obama2, "me3.jpg": obama, "photo.jpg": obama,
        "friend.jpg": biden, "alice.jpg": obama, "bob.jpg": biden, "room.jpg": obama2, "painting.jpg": biden,
        "party.jpg": pair, "group.jpg": pair, "friends.jpg": pair, "us-two.jpg": pair, "dancer.jpg": dancer,
        "landscape.jpg": blank,
        "pose.png": _gradient(photos / "pose.png", (512, 768)), "depth.png": _gradient(photos / "depth.png", (512, 768)),
        "mask.png": _box_mask(photos / "mask.png", obama, (0.25, 0.1, 0.75, 0.6)),
        "mouth.png": _box_mask(photos / "mouth.png", pair, (0.1, 0.2, 0.4, 0.6)),
        "left.png": _box_mask(photos / "left.png", (64, 64), (0, 0, 0.5, 1)),
        "right.png": _box_mask(photos / "right.png", (64, 64), (0.5, 0, 1, 1)),
        "style.safetensors": _save_lora(sd15, made / "style.safetensors", "kohya", seed=11),
        "lcm-lora.safetensors": made / "lcm-SD1.5.safetensors",
        "ip-adapter-faceid_sd15.bin": tiny_models.adapter("faceid", "bin"),
        "ip-adapter_sd15.bin": tiny_models.reference("plain", "sd15"),
        "my-prompts.txt": _text(made / "my-prompts.txt", "# one prompt per line\na photo of a person\n"),
        "keys.txt": _text(made / "keys.txt", "a-key\n"),
        "identities/obama.jpg": obama, "identities/biden.jpg": biden,
        "my-photos/a.jpg": obama, "my-photos/b.jpg": obama2, "my-photos/c.jpg": biden,
        "my-photos/metadata.jsonl": _text(made / "metadata.jsonl", "".join(
            json.dumps({"file_name": n, "text": "a photo of a person"}) + "\n" for n in ("a.jpg", "b.jpg", "c.jpg"))),
        "generated/one.jpg": obama, "generated/two.jpg": obama2, "group/pair.jpg": pair,
        "other-method/obama/one.jpg": obama2, "other-method/obama/two.jpg": obama,
    })  # fmt: skip
    world.folders.update({
        "rv4": sd15, "my-sd15-model": sd15, "sd-vae-ft-mse": sd15 / "vae", "controlnet-kps-sd15": controlnet,
        "buffalo_l": face_models_dir, "clip-vit-large-patch14": clip, "configs": ROOT / "configs",
        # InstantID in its released layout (ip-adapter.bin, ControlNetModel/), and a folder of both face packs.
        "InstantID": build_instantid(sdxl, made / "InstantID", seed=5), "face-models": face_models_dir,
    })  # fmt: skip
    return world


def _side_by_side(left: Path, right: Path, path: Path) -> Path:
    with Image.open(left) as a, Image.open(right) as b:
        a, b = a.convert("RGB"), b.convert("RGB")
        height = 600
        a = a.resize((round(a.width * height / a.height), height))
        b = b.resize((round(b.width * height / b.height), height))
        both = Image.new("RGB", (a.width + b.width, height))
        both.paste(a, (0, 0))
        both.paste(b, (a.width, 0))
        both.save(path)
    return path


def _gradient(path: Path, size: tuple[int, int]) -> Path:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(x, (size[1], 1))] * 3, -1)).save(path)
    return path


def _box_mask(path: Path, like, box) -> Path:
    if isinstance(like, Path):
        with Image.open(like) as image:
            size = image.size
    else:
        size = like
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    mask[int(y0 * size[1]) : int(y1 * size[1]), int(x0 * size[0]) : int(x1 * size[0])] = 255
    Image.fromarray(mask).save(path)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _workspace(world: World, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, source in world.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for name, source in world.folders.items():
        (folder / name).symlink_to(source, target_is_directory=True)
    return folder


# ---------------------------------------------------------------------------------------------- the patches
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models, face_models_dir, faces_dir):
    """The fake Hub and the workspace files, with faceid pointed at them (see the module docstring)."""
    import huggingface_hub.constants
    import uvicorn
    from pose_helpers import UPRIGHT_PERSON, StandInOpenPose

    from faceid import hub as faceid_hub
    from faceid import plan, swap, tiny_vae
    from faceid.faces import analyzer as faceid_analyzer
    from faceid.faces.model_files import models_in_folder
    from faceid.families import FAMILIES
    from faceid.openpose import OPENPOSE_BODY, OpenPoseBody
    from faceid.service import core as service_core

    built = _build_world(tmp_path_factory.mktemp("docs-world"), tiny_models, face_models_dir, faces_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("FACEID_HOME", str(built.root / "faceid-home"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(built.hub.root))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

        verify = faceid_hub.verify
        patch.setattr(faceid_hub, "verify", lambda path, file: None if built.hub.holds(path) else verify(path, file))

        pretrained = faceid_analyzer.pretrained_models
        patch.setattr(
            faceid_analyzer,
            "pretrained_models",
            lambda models_dir=None, name="buffalo_l", download=True: (
                models_in_folder(built.face_models) if models_dir is None else pretrained(models_dir, name, download)
            ),
        )
        from_weights = tiny_vae._from_weights

        def tiny_from_weights(path):
            from diffusers import AutoencoderTiny

            return AutoencoderTiny.from_pretrained(Path(path).parent) if built.hub.holds(path) else from_weights(path)

        patch.setattr(tiny_vae, "_from_weights", tiny_from_weights)

        released_pose = OpenPoseBody.from_pretrained.__func__

        def pose_from_pretrained(cls, weights=None, device=None):
            if weights is not None:
                return released_pose(cls, weights, device)
            faceid_hub.fetch(OPENPOSE_BODY)  # the pinned download, from the fake Hub
            return cls(StandInOpenPose(UPRIGHT_PERSON, 240), device)

        patch.setattr(OpenPoseBody, "from_pretrained", classmethod(pose_from_pretrained))
        for family, values in DEFAULTS.items():
            for key, value in values.items():
                patch.setitem(FAMILIES[family].defaults, key, value)
        request = plan.request

        def capped_request(*args, **kwargs):
            requested, rest = request(*args, **kwargs)
            return _capped(requested), rest

        patch.setattr(plan, "request", capped_request)
        plan_swap = swap.plan_swap
        patch.setattr(swap, "plan_swap", lambda *a, resolution=512, **k: plan_swap(*a, resolution=SWAP_RESOLUTION, **k))
        # The service checks a swap's resolution (the family's shorter side by default) against that smallest one.
        swap_sizes = {name: {"width": SWAP_RESOLUTION, "height": SWAP_RESOLUTION} for name in FAMILIES}
        patch.setattr(service_core, "FAMILY_DEFAULTS", swap_sizes)
        patch.setattr(uvicorn, "run", _capture_app)
        yield built


def _capped(requested):
    """The settings asked for, with steps and size capped (see the module docstring)."""
    changes = {}
    if requested.num_inference_steps is not None and requested.num_inference_steps > MAX_STEPS:
        changes["num_inference_steps"] = MAX_STEPS
    width, height = requested.width, requested.height
    longest = max(width or 0, height or 0)
    if longest > MAX_SIDE:
        shrink = MAX_SIDE / longest
        if width is not None:
            changes["width"] = max(8, int(width * shrink) // 8 * 8)
        if height is not None:
            changes["height"] = max(8, int(height * shrink) // 8 * 8)
    return requested.replace(**changes) if changes else requested


CAPTURED: list = []


def _capture_app(app, host=None, port=None, **kwargs):
    """``uvicorn.run`` under the harness: keep the app ``faceid serve`` built."""
    CAPTURED.append(app)


# ---------------------------------------------------------------------------------------------- running a page
class Server:
    """A ``faceid serve`` of a page, through FastAPI's TestClient; ids bound from the ``# ->`` comments."""

    def __init__(self, app, keys: list[str]) -> None:
        from fastapi.testclient import TestClient

        self.client = TestClient(app, base_url=SERVER)  # the Host of the pages' URLs, which the server answers
        self.client.__enter__()
        self.keys = keys

    def headers(self, key):
        return {"Authorization": f"Bearer {key}"} if key else {}

    def generations(self) -> list[dict]:
        views = []
        for key in self.keys or [None]:
            response = self.client.get("/v1/generations?limit=100", headers=self.headers(key))
            assert response.status_code == 200, response.text
            views += response.json()["generations"]
        return views

    def wait(self, job_id=None, key=None) -> list[dict]:
        """Until every job (or ``job_id``) has finished; each must be done."""
        deadline = time.monotonic() + DEADLINE
        while True:
            views = self.generations() if job_id is None else [self.view(job_id, key)]
            if all(v["status"] in ("done", "failed", "cancelled") for v in views):
                break
            assert time.monotonic() < deadline, f"jobs still running after {DEADLINE} s: {views}"
            time.sleep(0.05)
        failed = [(v["id"], v["status"], v["error"]) for v in views if v["status"] != "done"]
        assert not failed, f"generations that did not end done: {failed}"
        return views

    def view(self, job_id, key=None) -> dict:
        response = self.client.get(f"/v1/generations/{job_id}", headers=self.headers(key))
        assert response.status_code == 200, response.text
        return response.json()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.client.__exit__(None, None, None)


@dataclass
class PageRun:
    page: str
    cwd: Path
    namespace: dict = field(default_factory=dict)
    server: Server | None = None
    bound: dict[str, str] = field(default_factory=dict)  # "3f2a..." -> an id
    last_generation: tuple[str, str | None] | None = None  # (id, the key that made it)
    image_ids: dict[str, str] = field(default_factory=dict)  # generation id -> its first image's id
    statuses: list[tuple[str, int]] = field(default_factory=list)  # faceid commands and their exit statuses

    def where(self, line: int) -> str:
        return f"{self.page}:{line}"

    # ------------------------------------------------------------------ python
    def python(self, block: Block) -> None:
        code = compile(block.code, f"{self.page}:{block.line}", "exec")
        exec(code, self.namespace)  # noqa: S102 - the documentation's own examples
        RAN["python"] += 1

    # ------------------------------------------------------------------ bash
    def bash(self, block: Block) -> None:
        expected = 0
        if block.marker and block.marker.startswith("expect exit"):
            expected = int(re.match(r"expect exit (\d+)", block.marker).group(1))
        for command in commands(block):
            words = shlex.split(self.substitute(command.text, command.line))
            if words[:2] == ["./run.sh", "test"]:
                run_sh = (ROOT / "run.sh").read_text()
                assert '"${1:-}" = "test"' in run_sh and "-m pytest" in run_sh, "run.sh no longer hands test to pytest"
                SKIPPED.append((self.page, command.line, "./run.sh test runs the test suite itself"))
            elif words[0] in ("faceid", "./run.sh"):
                self.faceid(words[1:], command, expected)
            elif words[0] == "curl":
                self.curl(words[1:], command)
            else:
                pytest.fail(
                    f"{self.where(command.line)}: no rule runs {words[0]!r}; mark the block <!-- not run: why -->"
                )

    def substitute(self, text: str, line: int) -> str:
        for placeholder, value in self.bound.items():
            text = text.replace(placeholder, value)
        if "<image-id>" in text:
            text = text.replace("<image-id>", self.first_image(line))
        left = re.findall(r"\b[0-9a-f]{4}\.\.\.", text)
        assert not left, f'{self.where(line)}: {left} not bound by an earlier \'# -> ... "id": "..."\' comment'
        return text

    def first_image(self, line: int) -> str:
        assert self.last_generation, f"{self.where(line)}: <image-id> before any generation"
        job_id, key = self.last_generation
        if job_id not in self.image_ids:
            (view,) = self.server.wait(job_id, key)
            self.image_ids[job_id] = re.fullmatch(r"/v1/images/(\w+)\.png", view["images"][0]).group(1)
        return self.image_ids[job_id]

    def faceid(self, argv: list[str], command: Command, expected: int) -> None:
        from faceid.cli import main

        if argv[:1] == ["serve"]:
            self.serve(argv)
            return
        started = time.perf_counter()
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse
            status = exit_.code
        TIMES.append((time.perf_counter() - started, f"{self.where(command.line)} faceid {' '.join(argv[:3])}"))
        assert status == expected, f"{self.where(command.line)}: `{command.text}` exited {status}, not {expected}"
        self.statuses.append((command.text, status))
        RAN["faceid"] += 1

    def serve(self, argv: list[str]) -> None:
        from faceid.cli import main
        from faceid.cli.main import build_parser

        if self.server is not None:
            self.server.close()
            self.server = None
        CAPTURED.clear()
        assert main(argv) == 0
        (app,) = CAPTURED
        args = build_parser().parse_args(argv)
        keys = list(args.api_key or [])
        if args.api_keys_file:
            keys += Path(args.api_keys_file).read_text().split()
        self.server = Server(app, keys)
        RAN["faceid"] += 1

    def curl(self, argv: list[str], command: Command) -> None:
        assert self.server is not None, f"{self.where(command.line)}: curl before any `faceid serve`"
        method, headers, form, files, body, url, out = None, {}, {}, [], None, None, None
        words = iter(argv)
        for word in words:
            if word == "-X":
                method = next(words)
            elif word == "-H":
                name, _, value = next(words).partition(":")
                headers[name.strip()] = value.strip()
            elif word == "-d":
                body = next(words)
            elif word == "-F":
                name, _, value = next(words).partition("=")
                if value.startswith("@"):
                    path = self.cwd / value[1:]
                    files.append((name, (path.name, path.read_bytes(), "application/octet-stream")))
                else:
                    form[name] = value
            elif word == "-u":  # basic auth, as curl sends it
                headers["Authorization"] = "Basic " + base64.b64encode(next(words).encode()).decode()
            elif word == "-o":
                out = next(words)
            elif word in ("-N", "-s", "-L"):
                pass
            elif word.startswith(SERVER):
                url = word[len(SERVER) :]
            else:
                pytest.fail(f"{self.where(command.line)}: curl option {word!r} is not one the harness knows")
        method = method or ("POST" if body is not None or files or form else "GET")
        response = self.server.client.request(
            method, url, headers=headers, content=body, data=form or None, files=files or None
        )
        codes = re.match(r"^((?:\d{3})(?:\s*(?:or|,)\s*\d{3})*)", command.comment)
        if codes:
            wanted = [int(c) for c in re.findall(r"\d{3}", codes.group(1))]
            assert response.status_code in wanted, f"{self.where(command.line)}: {response.status_code} {response.text}"
        else:
            assert 200 <= response.status_code < 300, (
                f"{self.where(command.line)}: {response.status_code} {response.text}"
            )
        if out:
            (self.cwd / out).write_bytes(response.content)
        if url.endswith("/events"):
            assert "event: done" in response.text, f"{self.where(command.line)}: the stream did not end done"
        if 200 <= response.status_code < 300 and response.headers.get("content-type", "").startswith(
            "application/json"
        ):
            data = response.json()
            for placeholder in re.findall(r'"id": "([0-9a-f]{4}\.\.\.)"', command.comment):
                self.bound[placeholder] = data["id"]
            if method == "POST" and url.startswith("/v1/generations"):
                key = headers.get("Authorization", "").removeprefix("Bearer ") or None
                self.last_generation = (data["id"], key)
        RAN["curl"] += 1

    def close(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            server.close()


# ---------------------------------------------------------------------------------------------- checks per page
def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _same_pixels(a, b) -> bool:
    return np.array_equal(
        _png(a) if isinstance(a, (str, Path)) else np.asarray(a),
        _png(b) if isinstance(b, (str, Path)) else np.asarray(b),
    )


def _check_readme(run: PageRun) -> None:
    from faceid.outputs import read_settings

    cwd, ns = run.cwd, run.namespace
    assert len(list((cwd / "outputs").glob("photo_s*.png"))) == 4 and list(
        (cwd / "outputs").glob("contact_sheet_s*.png")
    )
    assert sorted(p.name for p in (cwd / "garden").glob("photo_s*.png")) == ["photo_s7.png", "photo_s8.png"]
    assert read_settings(cwd / "garden" / "photo_s8.png")["seed"] == 8
    assert read_settings(next((cwd / "painted").glob("photo_s*.png")))["strength"] == 0.6
    swapped = sorted((cwd / "swapped").glob("party_swap_s*.png"))
    assert len(swapped) == 4 and Image.open(swapped[0]).size == Image.open(cwd / "party.jpg").size
    assert (cwd / "astronaut.png").is_file() and len(ns["result"].images) == 4 and ns["result"].settings.seed == 42


def _check_generation(run: PageRun) -> None:
    ns = run.namespace
    assert (run.cwd / "astronaut.png").is_file()
    assert len(ns["pair"].images) == 2 and ns["pair"].settings.seed == [1, 2]
    assert _same_pixels(ns["from_face"].images[0], ns["from_embedding"].images[0])
    assert all(_same_pixels(a, b) for a, b in zip(ns["drawn"].images, ns["again"].images, strict=True))
    assert ns["reading"].settings.scale == 0.7 and ns["reading"].settings.seed == [5, 6]
    assert ns["pipe"].adapter.active and ns["pipe"].adapter.scale == 1.0
    assert ns["concat"].settings.combine == "concat" and ns["early"].settings.identity_window == (0.0, 0.6)
    assert ns["structured"].settings.s_scale == 0.5 and ns["structured"].settings.shortcut is True
    assert ns["portrait_xl"].settings.base_model == "SG161222/RealVisXL_V3.0"
    assert "style" not in ns["pipe"].loras and (run.cwd / "identity_lora.safetensors").is_file()
    assert "identity_lora" in ns["stack"].list()
    steps = [step for step, _, _ in ns["shown"]]
    assert (
        steps == sorted(steps) and steps[-1] == ns["shown"][-1][1] and ns["shown"][-1][2].startswith("data:image/jpeg")
    )
    assert ns["quick"].settings.decoder == "tiny"
    assert ns["lcm"].settings.fast == "lcm" and ns["lcm"].settings.num_inference_steps == 4
    assert ns["guided"].settings.identity_guidance == 2.0
    assert ns["karras"].settings.scheduler == "dpm++-karras"
    assert len(ns["eight"].images) == 8 and len(ns["seeds"]) == 3
    assert ns["noise"].shape == ns["latents"].shape
    assert len(ns["faces"]) == 2


def _check_editing(run: PageRun) -> None:
    ns, cwd = run.namespace, run.cwd
    assert len(ns["dancing"].control_images) == 2
    assert ns["knight"].settings.strength == 0.6 and ns["inpainted"].settings.strength == 1.0
    assert ns["late"].settings.identity_window == (0.5, 1.0)
    assert ns["kps"].size == (1024, 1024) and ns["pose"].size == (512, 768) and np.asarray(ns["pose"]).any()
    assert ns["depth"].size == (512, 768) and ns["edges"].size == (512, 768)
    assert Image.open(cwd / "swapped.png").size == Image.open(cwd / "party.jpg").size and len(ns["twice"]) == 2
    assert (cwd / "canny" / "me_s4-control0.png").is_file()
    assert _same_pixels(cwd / "knight-again" / "me_s3.png", cwd / "knight" / "me_s3.png")
    assert (
        len(list((cwd / "swapped").glob("party_swap_s*.png"))) == 4 + 2 + 4
        and (cwd / "swapped" / "party_swap_mask.png").is_file()
    )


def _check_people(run: PageRun) -> None:
    ns = run.namespace
    assert _same_pixels(ns["boxes"].images[0], ns["again"].images[0])
    assert ns["boxes"].settings.regions == [(0.0, 0.0, 0.4, 1.0), (0.6, 0.0, 1.0, 1.0)]
    assert ns["masked"].settings.regions == "masks" and len(ns["both"].settings.style) == 2
    assert ns["garden"].settings.scale == 0.8 and len(list((run.cwd / "out").glob("*_s*.png"))) >= 6


def _check_cli(run: PageRun) -> None:
    cwd = run.cwd
    assert (cwd / "outputs" / "me_s42.png").is_file() and (cwd / "outputs" / "contact_sheet_s42.png").is_file()
    assert _same_pixels(cwd / "again" / "me_s43.png", cwd / "outputs" / "me_s43.png")
    assert list((cwd / "previews").glob("me_s3-step*.png")) and list((cwd / "fast").glob("me_s*.png"))
    assert list((cwd / "embeddings").glob("*.npy")) and list((cwd / "offline").glob("me_s*.png"))
    assert run.namespace["record"]["seed"] == 43 and run.namespace["settings"].seed == 43
    assert ('faceid generate --face landscape.jpg --prompt "a photo of a person" --out nothing', 2) in run.statuses


def _check_serving(run: PageRun) -> None:
    from faceid.settings import GenerationSettings

    assert GenerationSettings.from_png(run.cwd / "a.png").seed == 42
    assert list((run.cwd / "again").glob("me_s42.png"))


def _check_training(run: PageRun) -> None:
    smoke = run.cwd / "runs" / "smoke"
    for name in ("ip-adapter-faceid.bin", "ip-adapter-faceid.safetensors", "ip-adapter-faceid_lora.safetensors"):
        assert (smoke / name).is_file(), name
    assert (smoke / "checkpoint-3").is_dir()
    assert len((run.cwd / "my-dataset" / "manifest.jsonl").read_text().splitlines()) == 3


def _check_evaluation(run: PageRun) -> None:
    from faceid.outputs import read_settings

    cwd = run.cwd
    for out in ("eval", "runs/quick", "runs/groups", "runs/x"):
        assert (cwd / out / "results.jsonl").is_file() and (cwd / out / "summary.json").is_file(), out
    assert any("people" in json.loads(row) for row in (cwd / "runs/groups/results.jsonl").read_text().splitlines())
    assert (cwd / "scores.jsonl").is_file() and (cwd / "people.jsonl").is_file()
    methods = json.loads((cwd / "runs/methods/summary.json").read_text())["methods"]  # Comparing methods
    assert [m["method"] for m in methods] == ["faceid", "instantid"] and all(m["n"] == 2 for m in methods)
    plots = sorted(p.name for p in (cwd / "runs/methods/plots").iterdir())
    assert plots == ["faceid.png", "instantid.png", "methods.png"]
    (best,) = (cwd / "best").glob("me_s*.png")
    assert "best_of" in json.dumps(read_settings(best))
    assert len(run.namespace["best"]) == 2


def _check_checkpoints(run: PageRun) -> None:
    assert (run.cwd / "my-adapter.safetensors").is_file() and (run.cwd / "my-adapter_lora.safetensors").is_file()
    assert run.namespace["spec"].num_tokens == 4


def _check_speed(run: PageRun) -> None:
    ns = run.namespace
    a, b = (np.asarray(ns[k].images[0], np.int16) for k in ("fused", "unfused"))
    assert np.abs(a - b).max() <= 2
    assert list((run.cwd / "realtime").glob("me_s*.png"))


CHECKS = {
    "README.md": _check_readme,
    "docs/GENERATION.md": _check_generation,
    "docs/EDITING.md": _check_editing,
    "docs/PEOPLE_AND_STYLE.md": _check_people,
    "docs/CLI.md": _check_cli,
    "docs/SERVING.md": _check_serving,
    "docs/TRAINING.md": _check_training,
    "docs/EVALUATION.md": _check_evaluation,
    "docs/CHECKPOINTS.md": _check_checkpoints,
    "docs/SPEED.md": _check_speed,
}


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """At the end of the run: how many examples ran, and which were skipped, with their reasons."""

    class Summary:
        @pytest.hookimpl(trylast=True)
        def pytest_terminal_summary(self, terminalreporter):
            counts = ", ".join(f"{n} {kind}" for kind, n in RAN.items())
            terminalreporter.write_line(f"docs examples run: {counts}; skipped: {len(SKIPPED)}")
            for page, line, reason in SKIPPED:
                terminalreporter.write_line(f"  skipped {page}:{line}: {reason}")
            if os.environ.get("FACEID_DOCS_VERBOSE"):
                for seconds, where in sorted(TIMES, reverse=True)[:20]:
                    terminalreporter.write_line(f"  {seconds:6.2f} s  {where}")

    plugin = Summary()
    request.config.pluginmanager.register(plugin, "faceid-docs-summary")
    yield


@pytest.mark.parametrize("page", PAGES)
def test_examples(page, world, tmp_path, monkeypatch, capsys):
    cwd = _workspace(world, tmp_path / "workspace")
    monkeypatch.chdir(cwd)
    run = PageRun(page, cwd, {"__name__": "__docs__"})
    try:
        for block in blocks(page):
            if block.lang not in ("python", "bash"):
                continue
            if block.marker and block.marker.startswith("not run"):
                reason = block.marker.partition(":")[2].strip()
                assert reason, f"{page}:{block.line}: say why the block is not run"
                SKIPPED.append((page, block.line, reason))
                continue
            started = time.perf_counter()
            with capsys.disabled() if os.environ.get("FACEID_DOCS_VERBOSE") else contextlib.nullcontext():
                run.python(block) if block.lang == "python" else run.bash(block)
            TIMES.append((time.perf_counter() - started, f"{page}:{block.line}"))
    finally:
        run.close()
    if page in CHECKS:
        CHECKS[page](run)


def test_quick_start_comes_first_with_its_two_commands():
    first = next(b for b in blocks("README.md") if b.lang == "bash")
    assert [c.text for c in commands(first)] == [
        './run.sh generate --face photo.jpg --prompt "a photo of a person as an astronaut, best quality" --out outputs',
        "./run.sh test",
    ]
    text = (ROOT / "README.md").read_text()
    assert text.index("## Quick start") < text.index("## The web app") < text.index("## Python API")
    assert text.index("## Python API") < text.index("## Command line") < text.index("## Documentation")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    inside, found = False, set()
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside and line.startswith("#"):
            found.add(_anchor(line.lstrip("#")))
    return found


def test_links():
    """Every relative link of the pages points to a file that exists, and every #anchor to a heading there."""
    documented = {p.name for p in (ROOT / "docs").glob("*.md")}
    readme = (ROOT / "README.md").read_text()
    assert {n for n in documented if f"(docs/{n})" not in readme} == set(), "the README links every docs/ page"
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = ((ROOT / page).parent / file).resolve() if file else ROOT / page
            if not path.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_architecture_lists_every_module():
    """The layout in docs/ARCHITECTURE.md names every module and package of src/faceid, and nothing else."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    layout = next(b.code for b in blocks("docs/ARCHITECTURE.md") if b.lang == "text" and "src/faceid/" in b.code)
    listed, stack = set(), []
    for line in layout.splitlines()[1:]:
        match = re.match(r"^( +)(\S+)", line)
        if not match or match.group(2) in ("configs/", "benchmarks/"):
            continue
        depth = (len(match.group(1)) - 2) // 2
        name = match.group(2)
        if name.endswith(".py") or name.endswith("/"):
            del stack[depth:]
            listed.add("/".join([*stack, name.rstrip("/")]))
            if name.endswith("/"):
                stack.append(name.rstrip("/"))
    source = ROOT / "src" / "faceid"
    actual = {str(p.relative_to(source)) for p in source.rglob("*.py") if p.name != "__init__.py"}
    actual |= {str(p.parent.relative_to(source)) for p in source.rglob("__init__.py") if p.parent != source}
    actual.add("__init__.py")
    assert listed == actual, f"not listed: {sorted(actual - listed)}; listed but absent: {sorted(listed - actual)}"
    assert "static/" in text


def test_testing_lists_every_test_file():
    text = (ROOT / "docs" / "TESTING.md").read_text()
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if f"tests/{p.name}" not in text]
    assert not missing, f"docs/TESTING.md does not describe {missing}"
