"""Serving benchmark and soak over HTTP: streamed completions against running `mtp-runtime serve` processes.

`run_serving_bench`: for each server (labelled by its /health: the draft mode it was started with) and each
concurrency C, a bounded number of requests (the prompts cycled) sent by C clients, each streaming one request
at a time (a closed loop), after one untimed warm-up request per server. Per request: time to first token (TTFT),
time per output token after the first (TPOT) and latency; per level: requests/s and output tokens/s over the
level's wall time, and the p50 / p99 of each. Servers started with different --draft settings (e.g. 'none' and
'auto') on different ports are measured in one run and reported side by side.

`run_serving_soak`: many requests of mixed kinds (streamed, whole, a stream dropped after its first chunk, a list
of prompts, a refused one) against one server, sampling its resident memory from /metrics as they go.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import MTPRuntimeError

SOAK_SAMPLES = 10


@dataclass
class RequestTiming:
    ttft: float
    latency: float
    tokens: int
    tpot: float | None
    """None for a one-token answer."""


@dataclass
class ServingLevel:
    """One server at one concurrency."""

    server: str
    concurrency: int
    wall_s: float
    requests: list[RequestTiming]

    @property
    def tokens_per_second(self) -> float:
        return sum(r.tokens for r in self.requests) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_second(self) -> float:
        return len(self.requests) / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, name: str, q: float) -> float:
        values = [getattr(r, name) for r in self.requests if getattr(r, name) is not None]
        return float(np.percentile(values, q)) if values else float("nan")

    def to_dict(self) -> dict:
        out = {"server": self.server, "concurrency": self.concurrency, "requests": len(self.requests),
               "wall_s": self.wall_s, "requests_per_second": self.requests_per_second,
               "tokens_per_second": self.tokens_per_second,
               "output_tokens": sum(r.tokens for r in self.requests)}
        for name in ("ttft", "tpot", "latency"):
            out[f"{name}_s"] = {"p50": self.percentile(name, 50), "p99": self.percentile(name, 99)}
        return out


@dataclass
class ServingReport:
    num_requests: int
    max_tokens: int
    sampling: dict
    levels: list[ServingLevel] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"num_requests": self.num_requests, "max_tokens": self.max_tokens, "sampling": self.sampling,
                "levels": [level.to_dict() for level in self.levels]}

    def format(self) -> str:
        servers = list(dict.fromkeys(level.server for level in self.levels))
        lines = [f"serving: {self.num_requests} streamed requests per level, {self.max_tokens} new tokens each "
                 f"({'greedy' if not self.sampling.get('temperature') else 'sampled'}); times in ms",
                 f"{'server':<34}{'conc':>5}{'req/s':>8}{'tok/s':>9}{'vs ' + 'first':>9}{'TTFT p50':>10}"
                 f"{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"]
        for concurrency in dict.fromkeys(level.concurrency for level in self.levels):
            row = {level.server: level for level in self.levels if level.concurrency == concurrency}
            base = row.get(servers[0])
            for server in servers:
                level = row.get(server)
                if level is None:
                    continue
                ratio = level.tokens_per_second / base.tokens_per_second if base and base.tokens_per_second else 0
                ms = [1000 * level.percentile(n, q) for n in ("ttft", "tpot") for q in (50, 99)]
                lines.append(f"{server:<34}{concurrency:>5}{level.requests_per_second:>8.2f}"
                             f"{level.tokens_per_second:>9.1f}{ratio:>8.2f}x" + "".join(f"{v:>10.1f}" for v in ms))
        if len(servers) > 1:
            lines.append(f"vs first: output tok/s over {servers[0]}'s at the same concurrency")
        return "\n".join(lines)


@dataclass
class ServingSoakReport:
    requests: int
    rss_mb: list[tuple[int, float]] = field(default_factory=list)
    """(requests done, the server's resident memory in MiB); the first sample after the first request."""
    tokens: int = 0
    kinds: dict = field(default_factory=dict)

    @property
    def growth_mb(self) -> float:
        """RSS at the end minus RSS after the first tenth of the requests (once every kind has run)."""
        settled = next((mb for done, mb in self.rss_mb if done >= self.requests // SOAK_SAMPLES), self.rss_mb[0][1])
        return self.rss_mb[-1][1] - settled

    def to_dict(self) -> dict:
        return {"requests": self.requests, "rss_mb": self.rss_mb, "growth_mb_after_first_tenth": self.growth_mb,
                "tokens": self.tokens, "kinds": self.kinds}

    def format(self) -> str:
        samples = ", ".join(f"{done}: {mb:.1f}" for done, mb in self.rss_mb)
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.items())
        return (f"serving soak: {self.requests} requests ({kinds}), {self.tokens} tokens; server RSS MiB after "
                f"requests {{{samples}}}; growth since the first tenth: {self.growth_mb:+.1f} MiB")


def run_serving_bench(urls: list[str], prompts: list[str], concurrencies: list[int], num_requests: int,
                      max_tokens: int, sampling: dict, ignore_eos: bool = True, api_key: str | None = None,
                      progress: bool = False) -> ServingReport:
    """Every server at every concurrency, `num_requests` streamed requests each (see the module docstring)."""
    return asyncio.run(_bench(urls, prompts, concurrencies, num_requests, max_tokens, sampling, ignore_eos,
                              api_key, progress))


def run_serving_soak(url: str, prompts: list[str], requests: int, max_tokens: int, concurrency: int,
                     api_key: str | None = None, progress: bool = False) -> ServingSoakReport:
    """`requests` requests of mixed kinds, `concurrency` at a time, with the server's RSS sampled as they go."""
    return asyncio.run(_soak(url, prompts, requests, max_tokens, concurrency, api_key, progress))


async def _bench(urls, prompts, concurrencies, num_requests, max_tokens, sampling, ignore_eos, api_key, progress):
    import httpx
    from tqdm import tqdm

    report = ServingReport(num_requests, max_tokens, sampling)
    body = {"max_tokens": max_tokens, "stream": True, "ignore_eos": ignore_eos, "return_token_ids": True,
            **{k: v for k, v in sampling.items() if v is not None}}
    limits = httpx.Limits(max_connections=max(concurrencies) + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits, headers=_auth(api_key)) as client:
        labels = [await _label(client, url) for url in urls]
        bar = tqdm(total=len(urls) * len(concurrencies) * num_requests, desc="serving", unit="req", file=sys.stderr,
                   disable=not progress, leave=False)
        for url in urls:
            await _stream_one(client, url, {**body, "prompt": prompts[0], "max_tokens": min(max_tokens, 8)})
        for concurrency in concurrencies:
            for url, label in zip(urls, labels):
                report.levels.append(await _level(client, url, label, prompts, concurrency, num_requests, body, bar))
        bar.close()
    return report


async def _label(client, url: str) -> str:
    """'URL (draft MODE)' from the server's /health."""
    try:
        reply = await client.get(url + "/health")
        return f"{url.removeprefix('http://')} ({reply.json()['draft']})"
    except Exception as error:
        raise MTPRuntimeError(f"no mtp-runtime server answers at {url} ({error}); start one with `mtp-runtime "
                              "serve` and pass its address as --url") from None


async def _level(client, url, label, prompts, concurrency, num_requests, body, bar) -> ServingLevel:
    next_index = iter(range(num_requests))
    timings: list[RequestTiming] = []

    async def worker():
        for i in next_index:
            timings.append(await _stream_one(client, url, {**body, "prompt": prompts[i % len(prompts)]}))
            bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ServingLevel(label, concurrency, time.perf_counter() - start, timings)


async def _stream_one(client, url: str, body: dict, stop_after: int | None = None) -> RequestTiming:
    """One streamed completion; its timings (token ids counted from the chunks' return_token_ids)."""
    start = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            text = (await reply.aread()).decode(errors="replace")
            raise MTPRuntimeError(f"{url} answered {reply.status_code}: {text[:300]}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise MTPRuntimeError(f"{url} failed a request: {data['error'].get('message')}")
            count = sum(len(choice.get("token_ids") or []) for choice in data["choices"])
            if count:
                last = time.perf_counter()
                first = first or last
                tokens += count
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    break
    if first is None:
        raise MTPRuntimeError(f"{url} streamed no token")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return RequestTiming(ttft=first - start, latency=last - start, tokens=tokens, tpot=tpot)


async def _soak(url, prompts, requests, max_tokens, concurrency, api_key, progress) -> ServingSoakReport:
    import httpx
    from tqdm import tqdm

    report = ServingSoakReport(requests)
    every = max(1, requests // SOAK_SAMPLES)
    base = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    next_index = iter(range(requests))
    done = 0
    async with httpx.AsyncClient(timeout=None, headers=_auth(api_key)) as client:
        await _label(client, url)
        bar = tqdm(total=requests, desc="soak", unit="req", file=sys.stderr, disable=not progress, leave=False)

        async def worker():
            nonlocal done
            for i in next_index:
                kind, tokens = await _soak_request(client, url, {**base, "prompt": prompts[i % len(prompts)]}, i)
                report.kinds[kind] = report.kinds.get(kind, 0) + 1
                report.tokens += tokens
                done += 1
                bar.update()
                if done == 1 or done % every == 0 or done == requests:
                    report.rss_mb.append((done, await _server_rss_mb(client, url)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        bar.close()
    report.rss_mb.sort()
    return report


async def _soak_request(client, url: str, body: dict, i: int) -> tuple[str, int]:
    """Request i of the soak: its kind and the tokens it received."""
    kind = ("stream", "whole", "dropped", "list", "refused")[i % 5]
    if kind == "stream":
        return kind, (await _stream_one(client, url, {**body, "stream": True})).tokens
    if kind == "dropped":
        return kind, (await _stream_one(client, url, {**body, "stream": True}, stop_after=1)).tokens
    if kind == "refused":
        reply = await client.post(url + "/v1/completions", json={**body, "max_tokens": -1})
        if reply.status_code != 400:
            raise MTPRuntimeError(f"{url} answered {reply.status_code} to a bad request, not 400")
        return kind, 0
    if kind == "list":
        body = {**body, "prompt": [body["prompt"], body["prompt"][::-1] or "x"]}
    reply = await client.post(url + "/v1/completions", json=body)
    if reply.status_code != 200:
        raise MTPRuntimeError(f"{url} answered {reply.status_code}: {reply.text[:300]}")
    return kind, reply.json()["usage"]["completion_tokens"]


async def _server_rss_mb(client, url: str) -> float:
    """The server's resident memory in MiB, from its /metrics (prometheus_client's process collector)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(url + "/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_resident_memory_bytes":
                return sample.value / 2**20
    raise MTPRuntimeError(f"{url}/metrics has no process_resident_memory_bytes (the process collector needs Linux)")


def _auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
