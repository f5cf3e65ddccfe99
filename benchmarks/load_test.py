"""Load test of ``faceid serve``: loopback only, bounded in requests and time, on the tiny test models.

Three phases, each against a real ``faceid serve`` process on 127.0.0.1 (a free port) and its own data dir:

1. **one at a time** (``--max-batch 1``) and 2. **batched** (``--max-batch B``): C client threads submit R
   generation requests in total (1 image each, as fast as the server accepts them; a 429 is counted and
   retried after its ``Retry-After``), then wait for every accepted job. Printed: accepted / 429 / 5xx,
   latency from submission to done (p50, p95) and images per second over the phase.
3. **kill and restart**: the same load against a server that is SIGKILLed when about half of the jobs are
   done; a new server on the same data dir must end every accepted job ``done`` or ``failed`` with a reason.

    python benchmarks/load_test.py                      # defaults: 48 requests, 4 clients, batch 8
    python benchmarks/load_test.py --requests 96 --clients 8 --max-batch 16 --steps 4
    python benchmarks/load_test.py --ray                # faceid serve --ray: 1 model replica, then 2

With ``--ray`` the phases are ``faceid serve --ray`` on a local Ray instance (started by the server process, stopped
with it) with 1 and then 2 CPU model replicas, batched; no kill phase (the restart is tests/test_ray_serve.py's).

The tiny models come from the test suite's builders (``tests/tiny_models.py``), so the figures measure the
service (queueing, batching, the database, PNG writing) far more than the UNet: read them as ratios.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models, face_helpers: the test suite's model builders

PHASE_LIMIT_S = 300.0  # no phase runs longer than this, whatever the settings


@dataclass
class PhaseResult:
    name: str
    accepted: int = 0
    rejected_429: int = 0
    errors_5xx: int = 0
    other_4xx: int = 0
    latencies: list[float] = field(default_factory=list)
    done: int = 0
    failed: list[str] = field(default_factory=list)
    unfinished: int = 0
    seconds: float = 0.0

    def row(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) if lat else float("nan")
        p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan")
        rate = self.done / self.seconds if self.seconds else 0.0
        return (
            f"| {self.name} | {self.accepted} | {self.rejected_429} | {self.errors_5xx} | {p50:.2f} | {p95:.2f} "
            f"| {rate:.2f} | {self.done} | {len(self.failed)} | {self.unfinished} |"
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A ``faceid serve`` subprocess on loopback."""

    def __init__(
        self, data: Path, models: dict[str, str], max_batch: int, max_queue: int, replicas: int | None = None
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ray = replicas is not None
        command = [
            sys.executable, "-m", "faceid.cli", "serve", "--port", str(self.port), "--data-dir", str(data),
            "--base-model", models["base"], "--adapter", models["adapter"], "--face-models", models["face_models"],
            "--max-batch", str(max_batch), "--max-queue", str(max_queue),
        ]  # fmt: skip
        command += ["--ray", "--replicas", str(replicas)] if self.ray else ["--device", "cpu"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "RAY_USAGE_STATS_ENABLED": "0"}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_healthy()

    def _wait_healthy(self, limit: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("faceid serve exited: " + self.process.stderr.read().decode()[-2000:])
            try:
                health = httpx.get(f"{self.base}/health", timeout=1)
                if health.status_code == 200 and health.json()["status"] == "ok":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"faceid serve did not answer /health within {limit} s")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.process.stderr.close()

    def stop(self) -> None:
        if self.process.poll() is None:  # Ray: SIGINT, so that the server stops the Ray instance it started
            self.process.send_signal(signal.SIGINT if self.ray else signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.process.stderr.close()


def enroll(base: str, photo: Path) -> str:
    import httpx

    files = [("photos", (photo.name, photo.read_bytes(), "image/jpeg"))]
    response = httpx.post(f"{base}/v1/identities", files=files, timeout=60)
    response.raise_for_status()
    return response.json()["id"]


def submit_load(base: str, identity: str, args, result: PhaseResult, deadline: float) -> dict[str, float]:
    """C threads submit R requests; returns job id -> submission time. 429s are counted and retried."""
    import httpx

    submitted: dict[str, float] = {}
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def client() -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            for index in counter:
                body = {
                    "prompt": "a photo of a person in a garden", "identity_id": identity, "seed": index,
                    "num_images_per_prompt": 1, "num_inference_steps": args.steps, "width": args.size,
                    "height": args.size,
                }  # fmt: skip
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    response = http.post("/v1/generations", json=body)
                    with lock:
                        if response.status_code == 202:
                            result.accepted += 1
                            submitted[response.json()["id"]] = started
                            break
                        if response.status_code == 429:
                            result.rejected_429 += 1
                        elif response.status_code >= 500:
                            result.errors_5xx += 1
                            break
                        else:
                            result.other_4xx += 1
                            break
                    time.sleep(min(float(response.headers.get("Retry-After", "1")), 1.0))

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return submitted


def wait_all(base: str, submitted: dict[str, float], result: PhaseResult, deadline: float) -> None:
    import httpx

    pending = dict(submitted)
    with httpx.Client(base_url=base, timeout=30) as http:
        while pending and time.monotonic() < deadline:
            for job, started in list(pending.items()):
                try:
                    view = http.get(f"/v1/generations/{job}").json()
                except httpx.TransportError:
                    return  # the server went away (the kill phase); the caller looks again after the restart
                if view["status"] == "done":
                    result.done += 1
                    result.latencies.append(time.monotonic() - started)
                    del pending[job]
                elif view["status"] in ("failed", "cancelled"):
                    result.failed.append(f"{job}: {view.get('error') or view['status']}")
                    del pending[job]
            time.sleep(0.05)
    result.unfinished = len(pending)


def run_phase(
    name: str, models: dict[str, str], photo: Path, args, max_batch: int, replicas: int | None = None
) -> PhaseResult:
    result = PhaseResult(name)
    with tempfile.TemporaryDirectory(prefix="faceid-load-") as data:
        server = Server(Path(data), models, max_batch, args.max_queue, replicas)
        try:
            identity = enroll(server.base, photo)
            start = time.monotonic()
            deadline = start + PHASE_LIMIT_S
            submitted = submit_load(server.base, identity, args, result, deadline)
            wait_all(server.base, submitted, result, deadline)
            result.seconds = time.monotonic() - start
        finally:
            server.stop()
    return result


def run_kill_phase(models: dict[str, str], photo: Path, args) -> PhaseResult:
    import httpx

    result = PhaseResult("SIGKILL mid-load, restart")
    with tempfile.TemporaryDirectory(prefix="faceid-load-") as data:
        server = Server(Path(data), models, args.max_batch, args.max_queue)
        start = time.monotonic()
        deadline = start + PHASE_LIMIT_S
        try:
            identity = enroll(server.base, photo)
            submitted = submit_load(server.base, identity, args, result, deadline)
            with httpx.Client(base_url=server.base, timeout=30) as http:  # kill when about half are done
                while time.monotonic() < deadline:
                    done = sum(http.get(f"/v1/generations/{j}").json()["status"] == "done" for j in submitted)
                    if done >= len(submitted) // 2:
                        break
                    time.sleep(0.1)
        finally:
            server.kill()
        print(f"  killed the server with {len(submitted)} accepted jobs, about half done", flush=True)
        restarted = Server(Path(data), models, args.max_batch, args.max_queue)
        try:
            wait_all(restarted.base, submitted, result, deadline)
        finally:
            restarted.stop()
        result.seconds = time.monotonic() - start
    return result


def build_models(folder: Path) -> dict[str, str]:
    from face_helpers import make_test_face_models_dir
    from tiny_models import TinyModels

    tiny = TinyModels(folder / "tiny")
    return {
        "base": str(tiny.sd15),
        "adapter": str(tiny.adapter("faceid", "safetensors")),
        "face_models": str(make_test_face_models_dir(folder / "face-models")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="generation requests per phase (48)")
    parser.add_argument("--clients", type=int, default=4, help="client threads submitting at once (4)")
    parser.add_argument("--max-batch", type=int, default=8, help="the batched server's --max-batch (8)")
    parser.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue (16): 429s above it")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per image (2)")
    parser.add_argument("--size", type=int, default=32, help="image width and height (32)")
    parser.add_argument("--ray", action="store_true", help="faceid serve --ray with 1, then 2 model replicas")
    args = parser.parse_args()
    if not (1 <= args.requests <= 1000 and 1 <= args.clients <= 32):
        parser.error("keep the load bounded: 1-1000 requests, 1-32 clients")

    photo = ROOT / "tests" / "data" / "faces" / "obama.jpg"
    with tempfile.TemporaryDirectory(prefix="faceid-load-models-") as folder:
        models = build_models(Path(folder))
        results = []
        if args.ray:
            phases = [(f"--ray, {n} replica(s), --max-batch {args.max_batch}", args.max_batch, n) for n in (1, 2)]
        else:
            phases = [("one job at a time (--max-batch 1)", 1, None),
                      (f"batched (--max-batch {args.max_batch})", args.max_batch, None)]  # fmt: skip
        for name, batch, replicas in phases:
            print(f"phase: {name} ...", flush=True)
            results.append(run_phase(name, models, photo, args, batch, replicas))
        if not args.ray:
            print("phase: SIGKILL mid-load, then restart ...", flush=True)
            results.append(run_kill_phase(models, photo, args))

    print(
        f"\n{args.requests} requests x 1 image, {args.clients} clients, {args.steps} steps, {args.size}x{args.size}, "
        f"--max-queue {args.max_queue}, tiny SD1.5 on CPU\n"
    )
    print("| phase | accepted | 429 | 5xx | p50 s | p95 s | images/s | done | failed | unfinished |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(result.row())
    for result in results:
        for reason in result.failed[:5]:
            print(f"  {result.name}: failed {reason}")
    if results[0].done and results[1].done:
        label = "2 replicas vs 1" if args.ray else "batched vs one at a time"
        print(
            f"\n{label}: {results[1].done / results[1].seconds / (results[0].done / results[0].seconds):.2f}x images/s"
        )
    lost = sum(r.unfinished for r in results) + sum(r.errors_5xx for r in results)
    print("every accepted job ended done or failed with a reason" if not lost else f"{lost} jobs lost or 5xx")
    return 0 if not lost else 1


if __name__ == "__main__":
    sys.exit(main())
