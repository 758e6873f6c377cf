"""Prometheus metrics: one registry per app (no process-global state), served at ``GET /metrics``."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from aimichat.registry.live import LiveModels

from .errors import APIError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, models: LiveModels) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "aimichat_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "aimichat_request_duration_seconds",
            "Time to the end of the response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "aimichat_time_to_first_token_seconds",
            "Request start to first generated text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("aimichat_tokens", "Tokens processed", ["kind"], registry=r)  # kind: prompt | completion
        self.credits = Counter("aimichat_credits_charged", "Credits charged after settlement", registry=r)
        self.refusals = Counter("aimichat_quota_refusals", "Requests refused because credits were spent", registry=r)
        self.engine_errors = Counter("aimichat_engine_errors", "Engine failures by kind", ["kind"], registry=r)
        r.register(_EngineCollector(models))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_usage(self, prompt_tokens: int, completion_tokens: int, credits: int) -> None:
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)
        self.credits.inc(credits)


class _EngineCollector:
    """Reads each model's engine counters at scrape time, so engines need no metrics code."""

    def __init__(self, models: LiveModels) -> None:
        self.models = models

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("aimichat_engine_queue_depth", "Requests waiting for the engine", labels=["model"])
        running = GaugeMetricFamily(
            "aimichat_engine_running", "Requests the engine is generating for", labels=["model"]
        )
        ready = GaugeMetricFamily("aimichat_model_ready", "1 if the model can take requests here", labels=["model"])
        busy = GaugeMetricFamily("aimichat_engine_slots_busy", "Sequence slots in use", labels=["model"])
        slots = GaugeMetricFamily("aimichat_engine_slots", "Sequence slots", labels=["model"])
        up = GaugeMetricFamily("aimichat_upstream_up", "1 if the upstream is usable", labels=["model", "url"])
        for status in self.models.status():
            ready.add_metric([status.name], 1.0 if status.ready else 0.0)
            stats = status.stats
            if stats is None:
                continue
            queued.add_metric([status.name], stats.queued)
            running.add_metric([status.name], stats.running)
            if stats.slots is not None:
                busy.add_metric([status.name], stats.running)
                slots.add_metric([status.name], stats.slots)
            upstreams = stats.details.get("upstreams")
            if isinstance(upstreams, list):
                for item in upstreams:
                    if isinstance(item, dict) and "url" in item:
                        up.add_metric([status.name, str(item["url"])], 1.0 if item.get("state") == "up" else 0.0)
        yield from (queued, running, ready, busy, slots, up)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus' scrape; with ``AIMICHAT_METRICS_TOKEN`` set, only for a caller that presents it."""
    token = request.app.state.settings.metrics_token
    if token is not None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        wanted = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(presented.strip().encode(), wanted):
            raise APIError(
                401, "GET /metrics needs 'Authorization: Bearer <AIMICHAT_METRICS_TOKEN>'.", code="unauthorized"
            )
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
