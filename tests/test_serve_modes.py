"""``faceid serve`` beyond text-to-image: uploads, then img2img, inpainting, ControlNet (a tiny ControlNet of the tiny
SD1.5 model on the server's allowlist) and swap jobs by upload id, on the tiny models and the real photos."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from test_modes import make_controlnet
from test_serve import TINY, Recording, enroll, error, generate, make_client, png, wait_finished  # noqa: F401 (a fixture)

from faceid.service.jobs import QueuedJob
from faceid.settings import GenerationSettings

STEPS = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def controlnet_dir(tiny_models, tmp_path_factory):
    """A tiny ControlNet of the tiny SD1.5 model, saved as a diffusers folder (what --controlnet KIND=SOURCE names)."""
    folder = tmp_path_factory.mktemp("controlnet")
    make_controlnet(tiny_models.sd15, seed=1).save_pretrained(folder)
    return folder


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def upload(client, data: bytes, name: str = "image.png", headers=None):
    return client.post("/v1/uploads", files={"image": (name, data, "image/png")}, headers=headers)


def upload_id(client, data: bytes, name: str = "image.png", headers=None) -> str:
    response = upload(client, data, name, headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def done(client, response) -> dict:
    assert response.status_code == 202, response.text
    view = wait_finished(client, response.json()["id"])
    assert view["status"] == "done", view
    return view


def metadata(client, url) -> dict:
    return json.loads(png(client.get(url)).text["faceid"])


# ---------------------------------------------------------------------- uploads
def test_upload_round_trip_owners_and_bad_images(make_client, faces_dir):  # noqa: F811
    client = make_client(api_keys=("key-a", "key-b"), max_upload_bytes=400_000)
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    # A phone photo stored sideways with an EXIF rotation: kept upright, its metadata dropped.
    sideways = encoded(picture(40, 24), "JPEG", exif=_orientation(6))
    response = upload(client, sideways, "phone.jpg", headers=a)
    assert response.status_code == 201, response.text
    view = response.json()
    assert (view["name"], view["width"], view["height"]) == ("phone.jpg", 24, 40)
    assert view["url"] == f"/v1/uploads/{view['id']}.png"
    assert client.get(f"/v1/uploads/{view['id']}", headers=a).json() == view
    assert [u["id"] for u in client.get("/v1/uploads", headers=a).json()] == [view["id"]]
    stored = png(client.get(view["url"], headers=a))
    assert stored.size == (24, 40) and not stored.getexif()

    # Another key: not found, not listed, not usable in a generation, not deletable.
    for path in (f"/v1/uploads/{view['id']}", view["url"]):
        error(client.get(path, headers=b), 404, "not_found", "POST /v1/uploads")
    assert client.get("/v1/uploads", headers=b).json() == []
    error(client.delete(f"/v1/uploads/{view['id']}", headers=b), 404, "not_found")
    identity = enroll(client, faces_dir, "obama.jpg", headers=b).json()["id"]
    refused = generate(client, identity, headers=b, init_image=view["id"], **STEPS)
    error(refused, 422, "invalid_request", "init_image", "no upload", "POST /v1/uploads")

    # Bad files: a clear error naming the upload, nothing stored.
    jpeg = encoded(picture(64, 64), "JPEG")
    broken = upload(client, jpeg[: len(jpeg) * 6 // 10], "broken.jpg", headers=a)
    error(broken, 400, "bad_image", "image ('broken.jpg')", "truncated")
    error(upload(client, b"", "empty.png", headers=a), 400, "bad_image", "empty")
    error(upload(client, b"not an image", "notes.txt", headers=a), 400, "bad_image", "JPEG, PNG or WebP")
    error(upload(client, b"\0" * 500_000, "big.png", headers=a), 413, "limit_exceeded", "MB")
    assert len(client.get("/v1/uploads", headers=a).json()) == 1

    # Deleted: its row and file go.
    path = client.app.state.service.data.upload(view["id"])
    assert path.is_file()
    assert client.delete(f"/v1/uploads/{view['id']}", headers=a).status_code == 204
    assert not path.exists() and client.get(view["url"], headers=a).status_code == 404


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# ---------------------------------------------------------------------- generations from uploads
def test_img2img_inpaint_and_controlnet_jobs(make_client, faces_dir, controlnet_dir):  # noqa: F811
    client = make_client(controlnets={"canny": str(controlnet_dir), "kps": str(controlnet_dir)})
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    init = upload_id(client, encoded(picture(40, 24, seed=1)))
    mask = np.zeros((24, 40), np.uint8)
    mask[:, 20:] = 255
    mask_id = upload_id(client, encoded(Image.fromarray(mask)))
    photo = upload_id(client, (faces_dir / "obama.jpg").read_bytes(), "obama.jpg")

    # img2img: the size is the init image's; the mode, inputs and default-free strength are recorded.
    view = done(client, generate(client, identity, init_image=init, strength=0.5, width=None, height=None, **STEPS))
    assert (view["mode"], view["inputs"], view["control_images"]) == ("img2img", {"init_image": init}, [])
    assert (view["settings"]["width"], view["settings"]["height"], view["settings"]["strength"]) == (40, 24, 0.5)
    assert png(client.get(view["images"][0])).size == (40, 24)
    stored = metadata(client, view["images"][0])
    assert (stored["mode"], stored["init_image"], stored["strength"]) == ("img2img", init, 0.5)

    # inpainting: strength defaults to the library's 1.0, recorded
    view = done(client, generate(client, identity, init_image=init, mask_image=mask_id, width=None, height=None,
                                 **STEPS))  # fmt: skip
    assert (view["mode"], view["settings"]["strength"]) == ("inpaint", 1.0)
    assert png(client.get(view["images"][0])).size == (40, 24)

    # ControlNet: canny edges of the photo, at the output's size, saved beside the image
    controls = [{"kind": "canny", "image": photo, "scale": 0.8, "window": [0.0, 0.5]}]
    view = done(client, generate(client, identity, controls=controls, width=24, height=16, **STEPS))
    assert view["mode"] == "controlnet" and view["inputs"]["controls"][0]["kind"] == "canny"
    assert png(client.get(view["images"][0])).size == (24, 16)
    assert len(view["control_images"]) == 1
    edges = png(client.get(view["control_images"][0]))
    assert edges.size == (24, 16) and edges.mode == "RGB"
    assert metadata(client, view["images"][0])["controls"][0]["image"] == photo
    error(client.get(view["control_images"][0].replace("/0.png", "/1.png")), 404, "not_found", "has 1")

    # a photo without a face for a kps control image: the job fails with the library's one line, naming the upload
    gray = upload_id(client, encoded(Image.new("RGB", (64, 64), (128, 128, 128))))
    kps = [{"kind": "kps", "image": gray}]
    response = generate(client, identity, controls=kps, width=24, height=16, **STEPS)
    view = wait_finished(client, response.json()["id"])
    assert view["status"] == "failed" and view["control_images"] == []
    assert view["error"].startswith(f"No face found in upload {gray} (controls[0].image)"), view["error"]

    # a queued job whose upload was deleted fails saying so
    client.app.state.service.queue.set_paused(True)
    response = generate(client, identity, init_image=init, width=None, height=None, **STEPS)
    assert client.delete(f"/v1/uploads/{init}").status_code == 204
    client.app.state.service.queue.set_paused(False)
    view = wait_finished(client, response.json()["id"])
    assert view["status"] == "failed" and "init_image: upload" in view["error"] and "deleted" in view["error"]


def test_mode_requests_that_do_not_fit_are_422(make_client, faces_dir, controlnet_dir):  # noqa: F811
    client = make_client(controlnets={"canny": str(controlnet_dir)}, start_workers=False, max_side=64)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    init = upload_id(client, encoded(picture(40, 24)))
    big = upload_id(client, encoded(picture(96, 24)))

    def refused(*words, **fields):
        return error(generate(client, identity, **STEPS, **fields), 422, "invalid_request", *words)

    refused("'pose'", "it has: canny", "--controlnet pose=SOURCE", controls=[{"kind": "pose", "image": init}])
    refused("controls.0.kind", controls=[{"kind": "sketch", "image": init}])
    refused("controls.0.window", controls=[{"kind": "canny", "image": init, "window": [0.5, 0.5]}])
    refused("controls[0].image", "no upload", controls=[{"kind": "canny", "image": "0" * 32}])
    refused("strength applies to img2img", strength=0.5)
    refused("mask_image needs init_image", mask_image=init)
    refused("swap", "leave out init_image", init_image=init, swap={"target": init})
    refused("leave out width and height", swap={"target": init}, width=24)
    refused("swap.resolution", "multiple of 8", swap={"target": init, "resolution": 100})
    refused("init_image", "no upload", init_image="../../faceid.db")
    message = error(generate(client, identity, init_image=big, width=None, height=None, **STEPS), 422,
                    "limit_exceeded", "width", "init_image")  # fmt: skip
    assert "give width or height" in message
    assert client.app.state.service.queue.depth == 0  # nothing was queued
    models = client.get("/v1/models").json()
    assert models["controlnets"] == {"canny": str(controlnet_dir)} and "swap" in models["modes"]


def test_batches_hold_jobs_with_the_same_inputs_only(make_client, faces_dir, pipe):  # noqa: F811
    recording = Recording(pipe)
    client = make_client(pipeline=recording, start_workers=False, max_batch=4)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    first, second = (upload_id(client, encoded(picture(24, 16, seed=s))) for s in (1, 2))
    same = {"init_image": first, "width": None, "height": None, **STEPS}
    jobs = [
        generate(client, identity, seed=1, **same).json()["id"],
        generate(client, identity, seed=2, init_image=second, width=None, height=None, **STEPS).json()["id"],
        generate(client, identity, seed=3, **same).json()["id"],
        generate(client, identity, seed=4, width=24, height=16, **STEPS).json()["id"],  # text-to-image, same size
    ]
    client.app.state.service.queue.set_paused(False)
    views = [wait_finished(client, job) for job in jobs]
    assert all(v["status"] == "done" for v in views), views
    assert sorted(call.seed for call in recording.calls) == [[1, 3], [2], [4]]  # one call per set of inputs

    # What a batch gives each job is what it gets alone.
    alone = wait_finished(client, generate(client, identity, seed=3, **same).json()["id"])
    batched = np.asarray(png(client.get(views[2]["images"][0])), dtype=int)
    assert np.abs(batched - np.asarray(png(client.get(alone["images"][0])), dtype=int)).max() <= 1

    # Swaps never share a batch, even with the same target and settings.
    settings = GenerationSettings(prompt="a", seed=[1])
    twins = [QueuedJob(id=i, owner="", settings=settings, identity_ids=["x"], created_ns=0,
                       inputs={"swap": {"target": first, "face_index": 0}}) for i in ("a", "b")]  # fmt: skip
    assert twins[0].batch_key != twins[1].batch_key


def test_swap_job_keeps_the_target_size(make_client, faces_dir):  # noqa: F811
    client = make_client()
    biden = enroll(client, faces_dir, "biden.jpg").json()["id"]
    target = upload_id(client, (faces_dir / "obama2.jpg").read_bytes(), "obama2.jpg")
    swap = {"target": target, "resolution": 64}
    view = done(client, generate(client, biden, swap=swap, seed=5, num_images_per_prompt=2, prompt=None, width=None,
                                 height=None, **STEPS))  # fmt: skip
    assert view["mode"] == "swap" and view["inputs"]["swap"] == {**swap, "face_index": 0}
    assert len(view["images"]) == 2 and all(png(client.get(url)).size == (626, 1200) for url in view["images"])
    settings = view["settings"]
    assert max(settings["width"], settings["height"]) == 64 and settings["strength"] == 1.0
    assert settings["prompt"].startswith("a photo of a person's face")  # the CLI's default swap prompt
    stored = metadata(client, view["images"][1])
    assert (stored["mode"], stored["seed"], stored["target_size"]) == ("swap", 6, [626, 1200])
    # outside the crop, the target as it was
    x1, y1, x2, y2 = stored["crop_box"]
    original = np.asarray(Image.open(faces_dir / "obama2.jpg").convert("RGB"), dtype=int)
    swapped = np.asarray(png(client.get(view["images"][0])), dtype=int)
    outside = np.ones(original.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.abs(swapped - original)[outside].max() <= 3  # the PNG of the upload vs the decoded JPEG: equal

    # A target without a face: the job fails with the library's one line.
    gray = upload_id(client, encoded(Image.new("RGB", (96, 96), (128, 128, 128))))
    response = generate(client, biden, swap={"target": gray, "resolution": 64}, width=None, height=None, **STEPS)
    view = wait_finished(client, response.json()["id"])
    assert view["status"] == "failed" and view["error"].startswith(f"No face found in upload {gray} (swap.target)")


def test_serve_controlnet_flags(tmp_path, capsys, controlnet_dir):
    from faceid.cli import build_parser, main
    from faceid.cli.serve import _controlnets

    other = tmp_path / "other"
    shutil.copytree(controlnet_dir, other)
    args = build_parser().parse_args(["serve", "--controlnet", f"canny={controlnet_dir}", "--controlnet",
                                      f"kps={other}"])  # fmt: skip
    # each source's family read from its config (tests/test_serve_flux_controls.py: one per family)
    assert _controlnets(args.controlnet) == {"canny": {"SD1.5": str(controlnet_dir)}, "kps": {"SD1.5": str(other)}}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--controlnet", "sketch=x"])
    assert "KIND=SOURCE with KIND one of canny" in capsys.readouterr().err
    data = str(tmp_path / "d")
    twice = ["--controlnet", f"canny={controlnet_dir}", "--controlnet", f"canny={other}"]
    assert main(["serve", "--data-dir", data, *twice]) == 2
    assert "given twice for SD1.5" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------- several people and style references
@pytest.fixture
def fresh_pipe(tiny_models, analyzer):
    """A pipeline of its own (a quarter second): a server loads its style adapters onto its pipeline."""
    from faceid.pipeline import FaceIDPipeline

    return FaceIDPipeline.from_pretrained(
        tiny_models.sd15, tiny_models.adapter("faceid", "safetensors"), device="cpu", progress=False,
        face_analyzer=analyzer,
    )  # fmt: skip


def generate_group(client, people, headers=None, **settings):
    """POST a generation of several ``people`` in every picture."""
    body = {"prompt": "two people in a garden", **TINY, "people": people, **settings}
    return client.post("/v1/generations", json=body, headers=headers)


def side_by_side(faces_dir, *names) -> Image.Image:
    """A group photo: the photos next to each other, left to right."""
    photos = [Image.open(faces_dir / name).convert("RGB") for name in names]
    group = Image.new("RGB", (sum(p.width for p in photos), max(p.height for p in photos)), "white")
    x = 0
    for photo in photos:
        group.paste(photo, (x, 0))
        x += photo.width
    return group


def test_two_people_in_one_picture(make_client, faces_dir):  # noqa: F811
    client = make_client()
    obama, biden = (enroll(client, faces_dir, name).json()["id"] for name in ("obama.jpg", "biden.jpg"))

    # regions left out: "auto", two columns; the job's identities are the people, recorded in the PNG
    view = done(client, generate_group(client, [obama, biden], seed=3, **STEPS))
    assert (view["identity_ids"], view["inputs"]["people"], view["inputs"]["regions"]) == (
        [obama, biden], [obama, biden], "auto"
    )  # fmt: skip
    assert view["settings"]["regions"] == "auto" and view["mode"] == "text-to-image"
    stored = metadata(client, view["images"][0])
    assert (stored["people"], stored["regions"], stored["regions_input"]) == ([obama, biden], "auto", "auto")
    assert (
        "identity_id" not in stored
        and GenerationSettings.parse({k: v for k, v in stored.items() if k in GenerationSettings.model_fields}).regions
        == "auto"
    )

    # a group photo: its faces, left to right, give the columns, recorded as boxes once the job ran
    group = upload_id(client, encoded(side_by_side(faces_dir, "obama.jpg", "biden.jpg")), "pair.png")
    view = done(client, generate_group(client, [obama, biden], regions={"photo": group},
                                 seed=3, **STEPS))  # fmt: skip
    (left, right) = view["settings"]["regions"]
    width = Image.open(faces_dir / "obama.jpg").width
    assert left[0] == 0.0 and right[2] == 1.0 and left[2] == right[0]
    assert abs(left[2] - width / (width + Image.open(faces_dir / "biden.jpg").width)) < 0.2
    stored = metadata(client, view["images"][0])
    assert stored["regions_input"] == {"photo": group} and stored["regions"] == view["settings"]["regions"]

    # masks, one upload per person: recorded as "masks"
    halves = []
    for columns in (slice(0, 12), slice(12, 24)):
        mask = np.zeros((16, 24), np.uint8)
        mask[:, columns] = 255
        halves.append(upload_id(client, encoded(Image.fromarray(mask))))
    view = done(client, generate_group(client, [biden, obama], regions=halves, **STEPS))
    assert view["settings"]["regions"] == "masks" and view["inputs"]["regions"] == halves

    # a group photo with one face for two people: the job fails with the library's line, naming the upload
    single = upload_id(client, (faces_dir / "obama.jpg").read_bytes(), "obama.jpg")
    response = generate_group(client, [obama, biden], regions={"photo": single}, **STEPS)
    view = wait_finished(client, response.json()["id"])
    assert view["status"] == "failed" and view["error"].startswith(
        f"2 people to place but 1 face(s) found in upload {single} (regions.photo)"
    ), view["error"]


def test_a_style_reference_changes_the_picture(make_client, faces_dir, fresh_pipe, tiny_models):  # noqa: F811
    plain = str(tiny_models.reference("plain"))
    client = make_client(
        pipeline=fresh_pipe, style_adapters={"tiny": plain}, reference_encoder=str(tiny_models.image_encoder)
    )
    assert client.get("/v1/models").json()["style_adapters"] == {"tiny": plain}
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    image = upload_id(client, (faces_dir / "obama2.jpg").read_bytes(), "obama2.jpg")
    # loaded with the model set at start (never inside a job), counted in the worker's model memory
    assert set(fresh_pipe.references) == {"tiny"}
    before = client.get("/v1/models").json()["workers"][0]["memory"]["used_bytes"]

    without = done(client, generate(client, identity, seed=4, **STEPS))
    style = [{"image": image, "adapter": "tiny", "scale": 0.8}]
    styled = done(client, generate(client, identity, seed=4, style=style, **STEPS))
    assert styled["inputs"]["style"] == style
    assert styled["settings"]["style"] == [{"adapter": "tiny", "scale": 0.8}]
    pixels = [np.asarray(png(client.get(v["images"][0])), dtype=int) for v in (without, styled)]
    assert np.abs(pixels[0] - pixels[1]).max() > 0  # the same seed, the reference acts
    stored = metadata(client, styled["images"][0])
    assert stored["style_input"][0]["image"] == image and stored["style"][0]["adapter"] == "tiny"
    # nothing more was loaded by the jobs
    after = client.get("/v1/models").json()["workers"][0]["memory"]["used_bytes"]
    assert after == before and set(fresh_pipe.references) == {"tiny"}

    # with two people, a window and a mask region: recorded as the library records them
    mask = upload_id(client, encoded(Image.new("L", (24, 16), 255)))
    style = [{"image": image, "adapter": "tiny", "window": [0.0, 0.5], "region": mask}]
    biden = enroll(client, faces_dir, "biden.jpg").json()["id"]
    view = done(client, generate_group(client, [identity, biden], style=style, **STEPS))
    assert view["settings"]["style"] == [{"adapter": "tiny", "scale": 0.5, "window": [0.0, 0.5], "region": "mask"}]
    assert view["settings"]["regions"] == "auto"


def test_people_and_style_requests_that_do_not_fit_are_422(make_client, faces_dir, tiny_models, fresh_pipe):  # noqa: F811
    client = make_client(
        pipeline=fresh_pipe,
        api_keys=("key-a", "key-b"),
        style_adapters={"tiny": str(tiny_models.reference("plain"))},
        reference_encoder=str(tiny_models.image_encoder),  # loaded with the style adapter, at start
        start_workers=False,
    )
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    obama, biden = (enroll(client, faces_dir, name, headers=a).json()["id"] for name in ("obama.jpg", "biden.jpg"))
    theirs = enroll(client, faces_dir, "obama.jpg", headers=b).json()["id"]
    image = upload_id(client, encode_gray(), headers=a)

    def refused(*words, status=422, code="invalid_request", **fields):
        response = generate_group(client, fields.pop("people", [obama, biden]), headers=a, **STEPS, **fields)
        return error(response, status, code, *words)

    refused(
        "3 regions for 2 people", "one region per person", regions=[[0, 0, 0.3, 1], [0.3, 0, 0.6, 1], [0.6, 0, 1, 1]]
    )
    refused("1 regions for 2 people", regions=[image])
    refused("region 1", "is not a box", regions=[[0, 0, 0.5, 1], [0.7, 0, 0.6, 1]])
    refused("not a mix", regions=[[0, 0, 0.5, 1], image])
    refused("regions[1]", "no upload", regions=[image, "0" * 32])
    refused("regions.photo", "no upload", regions={"photo": "0" * 32})
    refused("regions places the people", "give people", people=None, identity_id=obama, regions="auto")
    refused("give one of identity_id", identity_id=obama)
    refused("people", "at most 6", people=[obama] * 7)
    refused("swap puts one person", swap={"target": image}, width=None, height=None)
    refused(f"no identity {theirs}", status=404, code="not_found", people=[obama, theirs])
    unknown = refused("style[0].adapter", "'oil'", "it has: tiny", "--style-adapter",
                      style=[{"image": image, "adapter": "oil"}])  # fmt: skip
    assert "GET /v1/models" in unknown
    refused("style[0].image", "no upload", style=[{"image": "0" * 32, "adapter": "tiny"}])
    refused("style[0].region", "is not a box", style=[{"image": image, "adapter": "tiny", "region": [0.5, 0, 0.2, 1]}])
    refused("'../ip-adapter.bin'", "it has: tiny", style=[{"image": image, "adapter": "../ip-adapter.bin"}])
    refused("style.0.file", "unknown field", style=[{"image": image, "adapter": "tiny", "file": "x"}])
    assert client.app.state.service.queue.depth == 0  # nothing was queued


def encode_gray() -> bytes:
    return encoded(Image.new("RGB", (24, 16), (128, 128, 128)))


def test_batches_hold_jobs_with_the_same_people_and_style_only(make_client, faces_dir, pipe):  # noqa: F811
    recording = Recording(pipe)
    client = make_client(pipeline=recording, start_workers=False, max_batch=4)
    obama, biden = (enroll(client, faces_dir, name).json()["id"] for name in ("obama.jpg", "biden.jpg"))
    pair = [obama, biden]
    jobs = [
        generate_group(client, pair, seed=1, **STEPS).json()["id"],
        generate_group(client, [biden, obama], seed=2, **STEPS).json()["id"],  # the other way round
        generate_group(client, pair, seed=3, **STEPS).json()["id"],
        generate(client, obama, seed=4, **STEPS).json()["id"],  # one person
    ]
    client.app.state.service.queue.set_paused(False)
    views = [wait_finished(client, job) for job in jobs]
    assert all(v["status"] == "done" for v in views), views
    assert sorted(call.seed for call in recording.calls) == [[1, 3], [2], [4]]
    alone = wait_finished(client, generate_group(client, pair, seed=3, **STEPS).json()["id"])
    batched = np.asarray(png(client.get(views[2]["images"][0])), dtype=int)
    assert np.abs(batched - np.asarray(png(client.get(alone["images"][0])), dtype=int)).max() <= 1

    # style references: the same ones share a batch, a different image, adapter, scale, window or region does not
    def key(**reference) -> str:
        style = [{"image": "a" * 32, "adapter": "tiny", "scale": 0.5, **reference}]
        settings = GenerationSettings(prompt="a", seed=[1])
        return QueuedJob(id="j", owner="", settings=settings, identity_ids=["x"], created_ns=0,
                         inputs={"style": style}).batch_key  # fmt: skip

    others = [key(image="b" * 32), key(adapter="oil"), key(scale=0.6), key(window=[0, 0.5]), key(region=[0, 0, 0.5, 1])]
    assert key() == key() and len({key(), *others}) == 6


def test_serve_style_adapter_flags(tmp_path, capsys):
    from faceid.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--style-adapter", "oil=plus", "--style-adapter", "mine=./a.bin",
                                      "--reference-encoder", "./encoder"])  # fmt: skip
    assert (args.style_adapter, args.reference_encoder) == ([("oil", "plus"), ("mine", "./a.bin")], "./encoder")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--style-adapter", "a.b=plus"])
    assert "NAME=SOURCE" in capsys.readouterr().err
    data = str(tmp_path / "d")
    assert main(["serve", "--data-dir", data, "--style-adapter", "oil=plus", "--style-adapter", "oil=plain"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_swap_with_a_drawn_mask_repaints_only_there(make_client, faces_dir):  # noqa: F811
    """swap.mask (what the web app paints on the target): the repainted area follows the mask, not the face."""
    client = make_client()
    biden = enroll(client, faces_dir, "biden.jpg").json()["id"]
    target = upload_id(client, (faces_dir / "obama2.jpg").read_bytes(), "obama2.jpg")
    original = np.asarray(Image.open(faces_dir / "obama2.jpg").convert("RGB"), dtype=int)
    face_only = done(client, generate(client, biden, swap={"target": target, "resolution": 64}, seed=5, prompt=None,
                                      width=None, height=None, **STEPS))  # fmt: skip
    x1, y1, x2, y2 = metadata(client, face_only["images"][0])["crop_box"]
    drawn = Image.new("L", (626, 1200), 0)
    drawn.paste(255, (x1 + 10, y1 + 10, x1 + 30, y1 + 30))  # a small patch in the crop's corner
    mask = upload_id(client, encoded(drawn.convert("RGB")))
    masked = done(client, generate(client, biden, swap={"target": target, "resolution": 64, "mask": mask}, seed=5,
                                   prompt=None, width=None, height=None, **STEPS))  # fmt: skip
    assert masked["inputs"]["swap"]["mask"] == mask
    changed = {}
    for name, view in (("face", face_only), ("mask", masked)):
        image = np.asarray(png(client.get(view["images"][0])), dtype=int)
        changed[name] = np.abs(image - original).max(axis=2) > 3
    ys, xs = np.nonzero(changed["mask"])
    assert len(ys) and changed["mask"].sum() < changed["face"].sum() / 4  # a patch, not the face
    assert ys.mean() < (y1 + y2) / 2 and xs.mean() < (x1 + x2) / 2  # around the painted corner
    # a mask of another size than the target: the job fails saying so
    wrong = upload_id(client, encoded(Image.new("RGB", (64, 64), "white")))
    response = generate(client, biden, swap={"target": target, "resolution": 64, "mask": wrong}, prompt=None,
                        width=None, height=None, **STEPS)  # fmt: skip
    view = wait_finished(client, response.json()["id"])
    assert view["status"] == "failed" and "mask" in view["error"], view["error"]
