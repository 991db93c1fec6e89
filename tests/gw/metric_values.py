"""Reading metrics in tests: one sample of an in-process gateway, or the scrape of a
node over HTTP."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chargegw.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` (0 when not exposed yet)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def parse(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    """The sum of every sample called ``name`` (over all its label sets)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def workers_with(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str
) -> set[str]:
    """The ``worker`` labels of the samples ``name`` whose value is above 0."""
    return {dict(labels)["worker"] for (n, labels), v in samples.items() if n == name and v > 0}


async def scrape(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``GET /metrics`` of the server at ``base_url``, parsed."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


class Monotonic:
    """Scrapes of one node whose summed ``counters`` must never go down from one scrape
    to the next (``rate()`` would see a reset): :meth:`scrape` fails if one does."""

    def __init__(self, base_url: str, counters: tuple[str, ...]) -> None:
        self.base_url = base_url
        self.counters = counters
        self.last: dict[str, float] = dict.fromkeys(counters, 0.0)

    async def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """A scrape checked against the previous one ({} if the connection failed: it
        may have been queued on a worker that just died)."""
        try:
            now = await scrape(self.base_url)
        except httpx.TransportError:
            return {}
        for name in self.counters:
            value = total(now, name)
            assert value >= self.last[name], f"{name} went back: {self.last[name]} -> {value}"
            self.last[name] = value
        return now
