"""Reading an engine's own `/metrics` for the autoscaler and the scale-down drain: bounded in time,
and a failure is an answer of its own (None), never zero load."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import autoscaler, render

# A CPU engine on a node its replicas share can take a while to answer; Prometheus allows 10s
SCRAPE_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class EngineSample:
    gauges: dict[str, float]  # orca:num_requests_waiting etc., summed over label sets
    ttft_buckets: list[tuple[float, float]] = field(default_factory=list)  # cumulative (le, count)

    @property
    def in_flight(self) -> float:
        return self.gauges.get("orca:num_requests_running", 0.0) + self.gauges.get("orca:num_requests_waiting", 0.0)


def parse(text: str) -> EngineSample:
    gauges: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in autoscaler.LOAD_METRICS.values():
                gauges[sample.name] = gauges.get(sample.name, 0.0) + sample.value
            elif sample.name == autoscaler.TTFT_HISTOGRAM + "_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return EngineSample(gauges, sorted(buckets.items()))


async def scrape(client: httpx.AsyncClient, pod_ip: str) -> EngineSample | None:
    try:
        answer = await client.get(f"http://{pod_ip}:{render.PORT}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS)
        answer.raise_for_status()
        return parse(answer.text)
    except (httpx.HTTPError, ValueError):
        return None


async def scrape_all(pod_ips: dict[int, str | None]) -> dict[int, EngineSample | None]:
    """One sample per replica group (by its stage-0 pod), all at once; a group without a ready pod is None."""
    async with httpx.AsyncClient() as client:
        async def one(ip: str | None) -> EngineSample | None:
            return await scrape(client, ip) if ip else None
        replicas = sorted(pod_ips)
        samples = await asyncio.gather(*(one(pod_ips[r]) for r in replicas))
    return dict(zip(replicas, samples))
