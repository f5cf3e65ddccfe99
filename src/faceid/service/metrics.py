"""Prometheus metrics of one server (its own registry: several apps in one process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .jobs import JobQueue

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# Why requests were refused (``faceid.service.policy``): a foreign Host or Origin, text that is not text, a full
# queue, a key over one of its quotas.
REFUSALS = ("forbidden_host", "forbidden_origin", "invalid_text", "queue_full", "quota_identities", "quota_uploads",
            "quota_stored_bytes", "quota_queued")  # fmt: skip


class Metrics:
    def __init__(self, queue: JobQueue) -> None:
        self.registry = registry = CollectorRegistry()
        Gauge("faceid_queue_depth", "generation jobs waiting", registry=registry).set_function(lambda: queue.depth)
        Gauge("faceid_jobs_running", "generation jobs running", registry=registry).set_function(lambda: queue.running)
        self.submitted = Counter("faceid_jobs_submitted", "generation jobs accepted", registry=registry)
        self.jobs = Counter(
            "faceid_jobs_finished", "generation jobs finished, by status", ["status"], registry=registry
        )
        for status in ("done", "failed", "cancelled"):
            self.jobs.labels(status)
        self.latency = Histogram(
            "faceid_job_latency_seconds",
            "from submission to the end of a job that finished (done)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.images = Counter("faceid_images_generated", "images generated and stored", registry=registry)
        self.refusals = Counter(
            "faceid_refusals", "requests refused by the server's policy, by reason", ["reason"], registry=registry
        )
        for reason in REFUSALS:
            self.refusals.labels(reason)
        self.memory = Gauge(
            "faceid_device_memory_bytes", "CUDA memory, by device and kind", ["device", "kind"], registry=registry
        )

    def finished(self, status: str, nanoseconds: int, images: int) -> None:
        self.jobs.labels(status).inc()
        if status == "done":
            self.latency.observe(nanoseconds / 1e9)
            self.images.inc(images)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def render(self) -> bytes:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                self.memory.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
                self.memory.labels(device, "reserved").set(torch.cuda.memory_reserved(index))
                self.memory.labels(device, "max_allocated").set(torch.cuda.max_memory_allocated(index))
        return generate_latest(self.registry)
