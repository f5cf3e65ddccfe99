"""Smoke tests of the benchmark scripts on tiny models on the CPU (they run; their figures come from full-size runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_step.py"


def test_bench_step_tiny_smoke(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for variant in ("plain", "diffusers", "faceid", "faceid-fused"):
        assert any(row.startswith(f"| {variant}: ") for row in rows), f"no table row for {variant}:\n{proc.stdout}"
    assert "equality check (relative tolerance 0.001): PASSED" in proc.stdout, proc.stdout
    assert "remove() restore check: PASSED" in proc.stdout, proc.stdout

    data = json.loads(out_json.read_text())
    assert set(data["results"]) == {"plain", "diffusers", "faceid", "faceid-fused"}
    assert data["equality"]["passed"] and data["remove_restores_unet"]
    for result in data["results"].values():
        assert result["mean_ms"] > 0 and result["min_ms"] > 0 and len(result["times_ms"]) == 1
    # The three adapter paths agree closely, and differ clearly from the plain UNet.
    for check in data["equality"]["checks"].values():
        assert check["rel_diff"] < 1e-4
    assert data["equality"]["adapter_effect_vs_plain"]["rel_diff"] > 1e-2


def test_bench_e2e_tiny_smoke(tmp_path):
    out_json = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--tiny", "--device", "cpu",
         "--modes", "default,lcm,lcm-full-vae", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    rows = {row["mode"]: row for row in json.loads(out_json.read_text())["rows"]}
    assert list(rows) == ["default", "lcm", "lcm-full-vae"]
    assert (rows["default"]["unet_passes"], rows["lcm"]["unet_passes"]) == (6, 4)  # 3 steps with guidance; 4 without
    assert rows["lcm"]["decoder"] == "tiny VAE" and rows["lcm-full-vae"]["decoder"] == "full VAE"
    for row in rows.values():
        assert row["s_per_image_with_face"] > row["s_per_image"] > 0
    assert "4-step LCM without guidance, tiny VAE:" in proc.stdout


def test_methods_step_tiny_smoke(tmp_path):
    """benchmarks/methods_step.py at its tiny scale: every row runs, each method changes its base's output."""
    out_json = tmp_path / "methods.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "methods_step.py"), "--scale", "tiny", "--device", "cpu",
         "--steps", "1", "--repeats", "1", "--warmup", "0", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    data = json.loads(out_json.read_text())
    expected = {
        "sdxl": ["sdxl", "sdxl+faceid", "sdxl+instantid", "sdxl+pulid"],
        "flux": ["flux", "flux+pulid", "flux+infiniteyou"],
    }
    assert data["scale"] == "tiny" and list(data["families"]) == list(expected)
    for family, names in expected.items():
        rows = data["families"][family]["rows"]
        assert [row["row"] for row in rows] == names
        assert rows[0]["ratio_to_base"] == 1.0 and rows[0]["effect_vs_base"] == 0.0
        for row in rows:
            assert row["finite"] and len(row["times_ms"]) == 1 and row["median_ms"] > 0
            assert f"| {row['row']}: " in proc.stdout
        for row in rows[1:]:  # the method really acts: its output is not the base model's
            assert row["effect_vs_base"] > 1e-3 and row["extra_parameters"] > 0 and row["tokens_ms"] > 0
