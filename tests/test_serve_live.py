"""``faceid serve``'s live side: previews streamed as events while the images form (``--preview-every``, decoded by
the tiny VAE), and the few-step and identity-guidance settings over the API. On the tiny SD1.5 model with a tiny
AutoencoderTiny and the real photos."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image
from test_fast import _lora_file
from test_serve import (
    DEADLINE,
    TINY,
    Recording,
    enroll,
    error,
    event_stream,
    events,
    generate,
    make_client,  # noqa: F401 (a fixture)
    png,
    wait_finished,
)
from tiny_models import make_tiny_autoencoder

pytest.importorskip("fastapi")

from faceid.cli import build_parser  # noqa: E402
from faceid.cli.serve import SERVE_PREVIEW_EVERY, serve_preview_every  # noqa: E402
from faceid.errors import FaceIDError  # noqa: E402
from faceid.pipeline import FaceIDPipeline  # noqa: E402
from faceid.service import ServeConfig  # noqa: E402

JPEG_URL = "data:image/jpeg;base64,"


@pytest.fixture(scope="module")
def live_pipe(tiny_models, analyzer, tmp_path_factory):
    """Its own pipeline (the few-step LoRA loaded here stays on it), with a tiny AutoencoderTiny for previews."""
    return FaceIDPipeline.from_pretrained(
        tiny_models.sd15,
        tiny_models.adapter("faceid", "safetensors"),
        tiny_vae=make_tiny_autoencoder(tmp_path_factory.mktemp("tiny-vae")),
        device="cpu",
        progress=False,
        face_analyzer=analyzer,
    )


class Reader(threading.Thread):
    """Reads a generation's events in its own thread, as a client does: ``seen`` holds them; ``connected`` is set
    at the first one, ``previews[step]`` when the preview of that step arrives."""

    def __init__(self, client, job_id: str, steps: int) -> None:
        super().__init__(daemon=True)
        self.client, self.job_id = client, job_id
        self.seen: list[tuple[str, dict]] = []
        self.connected = threading.Event()
        self.previews = {step: threading.Event() for step in range(1, steps + 1)}

    def run(self) -> None:
        for kind, data in event_stream(self.client, self.job_id):
            self.seen.append((kind, data))
            self.connected.set()
            if kind == "preview":
                self.previews[data["step"]].set()


def _image(url: str) -> np.ndarray:
    assert url.startswith(JPEG_URL), url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix(JPEG_URL))))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"), dtype=float)


def test_batched_jobs_each_stream_their_own_previews_in_step_order(make_client, live_pipe, faces_dir):  # noqa: F811
    readers: list[Reader] = []

    def wait_for_readers(step):  # every preview reaches its reader before the next step runs: none is replaced
        assert all(reader.previews[step].wait(DEADLINE) for reader in readers), [r.seen for r in readers]

    recording = Recording(live_pipe, after_preview=wait_for_readers)
    client = make_client(pipeline=recording, start_workers=False, max_batch=4, preview_every=1)
    obama = enroll(client, faces_dir, "obama.jpg").json()["id"]
    biden = enroll(client, faces_dir, "biden.jpg").json()["id"]
    # decoder "tiny": the final images are decoded as the last preview is, so each job's can be matched to it
    run = {"num_inference_steps": 3, "decoder": "tiny"}
    two = {"prompt": ["a photo of a person", "a portrait of a person"], "identity_ids": [obama, biden]}
    a = client.post("/v1/generations", json={**TINY, **run, **two, "seed": 5}).json()["id"]  # 2 images
    b = generate(client, biden, prompt="an oil painting of a person", seed=[40], **run).json()["id"]  # 1 image
    readers += [Reader(client, a, 3), Reader(client, b, 3)]
    for reader in readers:
        reader.start()
        assert reader.connected.wait(DEADLINE)
    client.app.state.service.queue.set_paused(False)
    for reader in readers:
        reader.join(DEADLINE)
        assert not reader.is_alive()
    assert len(recording.calls) == 1 and len(recording.calls[0].prompt) == 3  # one pipeline call for both

    finals = {}
    for job, reader, count in ((a, readers[0], 2), (b, readers[1], 1)):
        kinds = [kind for kind, _ in reader.seen]
        assert kinds == ["queued"] + ["progress", "preview"] * 3 + ["done"], kinds
        shown = [data for kind, data in reader.seen if kind == "preview"]
        assert [(p["step"], p["total"]) for p in shown] == [(1, 3), (2, 3), (3, 3)]
        assert all(len(p["images"]) == count and p["image_index"] == list(range(count)) for p in shown)
        assert all(_image(url).shape == (16, 24, 3) for p in shown for url in p["images"])
        finals[job] = [np.asarray(png(client.get(url)), dtype=float) for url in reader.seen[-1][1]["images"]]
        assert len(finals[job]) == count
    # Each job's last preview is its own images (JPEG-close), not the other job's.
    for job, reader in ((a, readers[0]), (b, readers[1])):
        last = [_image(url) for url in [d for k, d in reader.seen if k == "preview"][-1]["images"]]
        for i, preview in enumerate(last):
            own = np.abs(preview - finals[job][i]).mean()
            others = [np.abs(preview - image).mean() for other in finals if other != job for image in finals[other]]
            assert all(own < d for d in others), (own, others)  # JPEG of 24x16 noise: close, not exact

    # A finished job keeps no preview: its events are the others, and the GET view does not carry previews.
    again = [kind for kind, _ in events(client, a)]
    assert again == ["queued", "progress", "progress", "progress", "done"], again
    assert "preview" not in json.dumps(client.get(f"/v1/generations/{a}").json())


def test_a_late_subscriber_gets_the_newest_preview_and_every_other_event(make_client, live_pipe, faces_dir):  # noqa: F811
    go, at_step_2 = threading.Event(), threading.Event()

    def hold_at_step_2(step):
        if step == 2:
            at_step_2.set()
            assert go.wait(DEADLINE)

    client = make_client(pipeline=Recording(live_pipe, after_preview=hold_at_step_2), preview_every=2)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    job = generate(client, identity, num_inference_steps=5, seed=1).json()["id"]
    assert at_step_2.wait(DEADLINE)  # previews of step 2 sent, step 3 not begun
    reader = Reader(client, job, 5)
    reader.start()
    assert reader.previews[2].wait(DEADLINE)
    assert [(kind, data.get("step")) for kind, data in reader.seen] == [
        ("queued", None), ("progress", 1), ("progress", 2), ("preview", 2)]  # fmt: skip
    go.set()
    reader.join(DEADLINE)
    assert reader.seen[-1][0] == "done", [(k, d.get("step")) for k, d in reader.seen]
    steps = [data["step"] for kind, data in reader.seen if kind == "preview"]
    assert steps[0] == 2 and steps == sorted(set(steps)) and set(steps) <= {2, 4, 5}  # every 2nd, and the last
    assert [data["step"] for kind, data in reader.seen if kind == "progress"] == [1, 2, 3, 4, 5]


def test_fast_and_identity_guidance_over_the_api(make_client, live_pipe, faces_dir, tmp_path):  # noqa: F811
    lora = _lora_file(live_pipe, "lcm", tmp_path)  # no download: a local LoRA, loaded at start (faceid serve --fast)
    client = make_client(pipeline=live_pipe, fast={"lcm": str(lora)})
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    body = {"fast": "lcm", "identity_guidance": 0.5, "seed": 3}
    accepted = generate(client, identity, **{**body, "num_inference_steps": None})
    assert accepted.status_code == 202, accepted.text
    seen = events(client, accepted.json()["id"])
    assert [data["step"] for kind, data in seen if kind == "progress"] == [1, 2, 3, 4]  # the preset's 4 steps
    view = wait_finished(client, accepted.json()["id"])
    assert view["status"] == "done", view
    settings = view["settings"]
    assert (settings["fast"], settings["num_inference_steps"], settings["guidance_scale"], settings["scheduler"],
            settings["identity_guidance"]) == ("lcm", 4, 1.0, "lcm", 0.5)  # fmt: skip
    stored = json.loads(png(client.get(view["images"][0])).text["faceid"])
    assert (stored["fast"], stored["num_inference_steps"], stored["identity_guidance"]) == ("lcm", 4, 0.5)

    # A preset the server was not started with: a 4xx that says which ones it has, and nothing is queued.
    # lightning is SDXL's, and this server serves SD1.5: said so, with the presets it has
    error(generate(client, identity, fast="lightning"), 422, "invalid_request", "'lightning'", "SDXL model sets",
          "is SD1.5", "presets: lcm")  # fmt: skip
    assert client.app.state.service.queue.depth == 0


def test_serve_preview_flags(tmp_path, capsys):
    args = build_parser().parse_args(["serve", "--tiny-vae"])
    assert args.tiny_vae == "auto" and args.preview_every is None
    assert serve_preview_every(None, "auto") == SERVE_PREVIEW_EVERY  # on with a tiny VAE
    assert serve_preview_every(None, None) is None  # off without: every preview would be a full VAE decode
    assert serve_preview_every(0, "auto") is None and serve_preview_every(3, None) == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--preview-every", "-1"])
    assert "must be at least 0" in capsys.readouterr().err
    with pytest.raises(FaceIDError, match="preview_every must be at least 1"):
        ServeConfig(data_dir=tmp_path / "d", loader=lambda *a: None, preview_every=0)
    assert not (tmp_path / "d").exists()
