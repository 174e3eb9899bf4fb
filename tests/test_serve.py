"""`mtp-runtime serve`: real server processes on free loopback ports, driven by the official `openai` client and
httpx; every answer compared with offline `generate` on the same checkpoint.

Two servers start in parallel: `main` (batch 16, a chat template) for the API, batching and metrics tests, and
`small` (batch 1, queue 1, an API key, no chat template) for 401, 429, the missing chat template and the drain
on SIGTERM. The checkpoint is builders' tiny mostly-right model with a byte-level tokenizer and 4096 positions.
"""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("openai")
import openai  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import mtp_runtime  # noqa: E402
from builders import build_mostly_right  # noqa: E402
from mtp_runtime.train.corpus import train_tokenizer  # noqa: E402

SNIPPETS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
            "class Point:\n    def __init__(self, x, y):\n        self.x = x\n", "import os\nimport sys\n"]
PROMPTS = ["def add(a, b):", "for i in", "class Point:", "import os", "    return", "print(", "def", "x = 1\n"]
KEY = "test-key"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
STARTUP_S = 120


class Server:
    """`mtp-runtime serve` in a child process on a free port."""

    def __init__(self, model: Path, log: Path, *args):
        command = [sys.executable, "-m", "mtp_runtime.cli", "serve", "--model", str(model), "--port", "0",
                   "--threads", "1", *map(str, args)]
        self.log = log
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.url = None

    def wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while self.url is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                raise AssertionError(f"server did not start: {self.log.read_text()}")
            if "serving" in line:
                self.url = line.split(" on ")[1].split()[0].removesuffix("/v1")
        return self.url

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """The checkpoint twice: with a chat template (main) and without (small)."""
    main = tmp_path_factory.mktemp("serve_main")
    text = main / "snippets.txt"
    text.write_text("\n".join(SNIPPETS * 4), encoding="utf-8")
    tokenizer = train_tokenizer([text], 300, main / "tokenizer.json")
    text.unlink()
    build_mostly_right(main, vocab=tokenizer.get_vocab_size(), num_mtp=2, seed=3, max_position_embeddings=4096)
    small = tmp_path_factory.mktemp("serve_small")
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        shutil.copy(main / name, small / name)
    (main / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return main, small


@pytest.fixture(scope="module")
def servers(folders, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve_logs")
    main = Server(folders[0], logs / "main.log", "--max-batch", 16, "--max-queue", 64,
                  "--served-model-name", "serve_main")
    small = Server(folders[1], logs / "small.log", "--max-batch", 1, "--max-queue", 1, "--api-key", KEY,
                   "--draft", "none", "--served-model-name", "serve_small")
    try:
        main.wait_ready()
        small.wait_ready()
        yield {"main": main, "small": small}
    finally:
        for server in (main, small):
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


@pytest.fixture(scope="module")
def main(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def client(main) -> openai.OpenAI:
    return openai.OpenAI(base_url=main.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def rt(folders):
    return mtp_runtime.load(folders[0], device="cpu", threads=1)


def offline(rt, prompt, max_tokens: int, **kwargs):
    return rt.generate(prompt, max_new_tokens=max_tokens, ignore_eos=True, **{"draft": "none", **kwargs})


def metrics(url: str) -> dict:
    """/metrics as {(name, labels): value}."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(values: dict, name: str, **labels) -> float:
    return values.get(("mtp_runtime:" + name, tuple(sorted(labels.items()))), 0.0)


def normal_request_works(url: str, headers: dict | None = None) -> None:
    reply = httpx.post(url + "/v1/completions", headers=headers,
                       json={"prompt": "def", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------------------------------ the API

def test_completion_equals_offline_generate(client, rt):
    out = client.completions.create(model="serve_main", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True, "draft": "chain"})
    expected = offline(rt, PROMPTS[0], 24)
    choice = out.choices[0]
    assert choice.text == expected.text and choice.model_extra["token_ids"] == expected.token_ids
    assert choice.finish_reason == "length" and choice.index == 0
    assert out.object == "text_completion" and out.model == "serve_main" and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids) and out.usage.completion_tokens == 24
    figures = out.model_extra["acceptance"]
    assert figures["drafted_tokens"] > 0 and figures["tau"] > 1.0  # this checkpoint's drafts are mostly right
    assert figures["accepted_tokens"] == round(sum(figures["cumulative_acceptance"]) * figures["draft_steps"])


def test_streaming_concatenates_to_the_offline_text(client, rt):
    chunks = list(client.completions.create(model="serve_main", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    expected = offline(rt, PROMPTS[1], 30)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    assert len(chunks) > 3  # streamed step by step, not in one piece
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["length"]
    assert "acceptance" in finishing[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_a_list_of_prompts_gets_one_choice_each(client, rt):
    out = client.completions.create(model="serve_main", prompt=PROMPTS[:3], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [offline(rt, p, 12).text for p in PROMPTS[:3]]
    assert out.usage.completion_tokens == 36


def test_stop_strings_cut_the_text_before_them(client, rt):
    full = offline(rt, PROMPTS[2], 40).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    out = client.completions.create(model="serve_main", prompt=PROMPTS[2], max_tokens=40, temperature=0,
                                    stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_generate(client, rt):
    def sample(seed: int, **extra) -> str:
        return client.completions.create(model="serve_main", prompt=PROMPTS[3], max_tokens=20, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True, **extra}).choices[0].text

    first = sample(7)
    assert sample(7) == first != sample(8)
    assert first == offline(rt, PROMPTS[3], 20, temperature=1.0, seed=7, draft="auto").text  # the server's default
    chained = sample(7, draft="chain", num_draft_tokens=2)
    assert chained == sample(7, draft="chain", num_draft_tokens=2)
    assert chained == offline(rt, PROMPTS[3], 20, temperature=1.0, seed=7, draft="chain", num_draft_tokens=2).text


def test_chat_completion_uses_the_chat_template(client, rt):
    messages = [{"role": "user", "content": "def add"}]
    out = client.chat.completions.create(model="serve_main", messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    prompt = rt.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.choices[0].message.content == offline(rt, prompt, 10).text
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    streamed = client.chat.completions.create(model="serve_main", messages=messages, max_tokens=10, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content


def test_models_and_health(main):
    models = httpx.get(main.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["serve_main"] and models["data"][0]["max_model_len"] == 4096
    health = httpx.get(main.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["draft"] == "auto"


def test_metrics_count_the_requests_sent(client, main):
    before = metrics(main.url)
    outs = [client.completions.create(model="serve_main", prompt=p, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True, "draft": "chain", "num_draft_tokens": 2})
            for p, n in zip(PROMPTS[:4], (5, 9, 13, 17))]
    after = metrics(main.url)

    def gained(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    figures = [o.model_extra["acceptance"] for o in outs]
    assert gained("request_success_total", finished_reason="length") == 4
    assert gained("generation_tokens_total") == sum(o.usage.completion_tokens for o in outs) == 44
    assert gained("prompt_tokens_total") == sum(o.usage.prompt_tokens for o in outs)
    assert gained("time_to_first_token_seconds_count") == 4
    assert gained("time_per_output_token_seconds_count") == 4
    assert gained("spec_decode_num_drafts_total") == sum(f["draft_steps"] for f in figures) > 0
    assert gained("spec_decode_num_draft_tokens_total") == sum(f["drafted_tokens"] for f in figures)
    assert gained("spec_decode_num_accepted_tokens_total") == sum(f["accepted_tokens"] for f in figures) > 0
    per_pos = sum(gained("spec_decode_num_accepted_tokens_per_pos_total", position=str(p)) for p in range(2))
    assert per_pos == sum(f["accepted_tokens"] for f in figures)
    assert metric(after, "num_requests_running") == 0 and metric(after, "num_requests_waiting") == 0
    assert after[("process_resident_memory_bytes", ())] > 0


# ------------------------------------------------------------------------------------------ batching

def test_sixteen_concurrent_streams_each_equal_offline_generate(main, rt):
    """Different prompts and lengths, started at staggered times: every stream's token ids and text equal offline
    greedy decoding of its prompt alone, and the running batch really held several of them."""
    before = metrics(main.url)
    jobs = [(f"{PROMPTS[i % len(PROMPTS)]}{' ' * (i // len(PROMPTS))}", 10 + 3 * i) for i in range(16)]

    def stream(job):
        prompt, max_tokens = job
        time.sleep(0.02 * (job[1] % 5))
        body = {"model": "serve_main", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "return_token_ids": True}
        ids, text = [], ""
        with httpx.stream("POST", main.url + "/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    ids += choice["token_ids"]
                    text += choice["text"]
        return ids, text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, jobs))
    for (prompt, max_tokens), (ids, text) in zip(jobs, results):
        expected = offline(rt, prompt, max_tokens)
        assert ids == expected.token_ids, prompt  # no token lost, duplicated or changed
        assert text == expected.text
    after = metrics(main.url)
    steps = metric(after, "iteration_batch_size_count") - metric(before, "iteration_batch_size_count")
    single = metric(after, "iteration_batch_size_bucket", le="1.0") - metric(before, "iteration_batch_size_bucket",
                                                                            le="1.0")
    assert steps > single  # some steps decoded more than one sequence
    shared = steps - (metric(after, "iteration_batch_size_bucket", le="4.0")
                      - metric(before, "iteration_batch_size_bucket", le="4.0"))
    assert shared > 0  # and some more than four


def test_a_disconnect_mid_stream_frees_its_slot(client, main):
    before = metrics(main.url)
    stream = client.completions.create(model="serve_main", prompt=PROMPTS[0], max_tokens=3000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while httpx.get(main.url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = metrics(main.url)
    assert httpx.get(main.url + "/health").json()["running"] == 0
    assert metric(after, "request_success_total", finished_reason="cancelled") == \
        metric(before, "request_success_total", finished_reason="cancelled") + 1
    assert metric(after, "generation_tokens_total") - metric(before, "generation_tokens_total") < 3000
    normal_request_works(main.url)


# ------------------------------------------------------------------------------------------ bad requests

LONG = list(range(5)) * 1000
BAD_REQUESTS = [
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("prompt of the wrong type", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("token id outside the vocabulary", {"prompt": [1, 99999]}, 400, "prompt"),
    ("over-long prompt", {"prompt": LONG}, 400, "prompt"),
    ("max_tokens beyond the context", {"prompt": "def", "max_tokens": 4096}, 400, "max_tokens"),
    ("max_tokens zero", {"prompt": "def", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens not an integer", {"prompt": "def", "max_tokens": "8"}, 400, "max_tokens"),
    ("negative temperature", {"prompt": "def", "temperature": -1}, 400, "temperature"),
    ("top_p zero", {"prompt": "def", "top_p": 0}, 400, "top_p"),
    ("top_k below -1", {"prompt": "def", "top_k": -2}, 400, "top_k"),
    ("seed not an integer", {"prompt": "def", "seed": "x"}, 400, "seed"),
    ("empty stop string", {"prompt": "def", "stop": [""]}, 400, "stop"),
    ("stream_options without stream", {"prompt": "def", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("unknown draft mode", {"prompt": "def", "draft": "bogus"}, 400, "draft"),
    ("bad tree shape", {"prompt": "def", "tree": "3,x"}, 400, "tree"),
    ("typical acceptance while greedy", {"prompt": "def", "temperature": 0, "acceptance": "typical"}, 400,
     "acceptance"),
    ("n above one", {"prompt": "def", "n": 2}, 400, "n"),
    ("unknown field", {"prompt": "def", "frobnicate": 1}, 400, "frobnicate"),
    ("too many prompts", {"prompt": ["def"] * 65}, 400, "prompt"),
    ("unknown model", {"prompt": "def", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error(main, name, body, status, param):
    reply = httpx.post(main.url + "/v1/completions", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert error["param"] == param and error["message"] and "\n" not in error["message"]
    normal_request_works(main.url)


@pytest.mark.parametrize("method,path,content,status,error_type", [
    ("POST", "/v1/completions", b"{not json", 400, "invalid_request_error"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "invalid_request_error"),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "invalid_request_error"),
    ("GET", "/v1/nothing", b"", 404, "not_found_error"),
    ("GET", "/v1/completions", b"", 405, "invalid_request_error"),
])
def test_malformed_request_gets_an_openai_error(main, method, path, content, status, error_type):
    reply = httpx.request(method, main.url + path, content=content, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["type"] == error_type
    normal_request_works(main.url)


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="serve_main", prompt="def", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="other", prompt="def")


# ------------------------------------------------------------------------------------------ the small server

def test_api_key_is_required(servers):
    url = servers["small"].url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.post(url + "/v1/completions", json={"prompt": "def"}, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        normal_request_works(url, {"Authorization": f"Bearer {KEY}"})
    assert httpx.get(url + "/health").status_code == 200  # health and metrics need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).models.list().data[0].id == "serve_small"


def test_without_a_chat_template_chat_is_a_clear_error(servers):
    reply = httpx.post(servers["small"].url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "no_chat_template" and "chat template" in reply.json()["error"]["message"]


def test_full_queue_gets_429_then_sigterm_drains(servers):
    """Batch 1, queue 1: a long stream runs, a second request waits, a third is refused with 429. SIGTERM then
    refuses new requests with 503 while the two finish (the stream by its client leaving, the queued one
    normally), and the server exits with status 0."""
    small = servers["small"]
    url, auth = small.url, {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "def", "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=60,
                      json={**body, "max_tokens": 4000, "stream": True}) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(reply=httpx.post(
            url + "/v1/completions", headers=auth, json={**body, "max_tokens": 5}, timeout=60)))
        waiter.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(url + "/v1/completions", headers=auth, json={**body, "max_tokens": 5})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"

        small.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.01)
        late = httpx.post(url + "/v1/completions", headers=auth, json={**body, "max_tokens": 5})
        assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable_error"
        next(line for line in lines if line.startswith("data: "))  # the running stream goes on
    waiter.join(30)
    assert queued["reply"].status_code == 200 and queued["reply"].json()["usage"]["completion_tokens"] == 5
    assert small.proc.wait(30) == 0


# ------------------------------------------------------------------------------------------ bench --url

def test_bench_against_the_server(main, servers, tmp_path):
    from click.testing import CliRunner

    from mtp_runtime.cli import main as cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(PROMPTS[:4]), encoding="utf-8")
    out = tmp_path / "serving.json"
    args = ["bench", "--prompts", prompts, "--max-new-tokens", 8, "--no-progress"]
    result = CliRunner().invoke(cli, [*map(str, args), "--url", main.url, "--concurrency", "1,2", "--num-requests",
                                      "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "TTFT p50" in result.stdout and "TPOT p99" in result.stdout
    levels = json.loads(out.read_text())["levels"]
    assert [(level["concurrency"], level["requests"], level["output_tokens"]) for level in levels] == [(1, 4, 32),
                                                                                                     (2, 4, 32)]
    soak = CliRunner().invoke(cli, [*map(str, args), "--url", main.url, "--soak", "20", "--concurrency", "2"])
    assert soak.exit_code == 0, soak.output
    assert "server RSS MiB" in soak.stdout and "dropped 4" in soak.stdout
    mixed = CliRunner().invoke(cli, [*map(str, args), "--url", main.url, "--draft", "chain"])
    assert mixed.exit_code == 1 and "--draft cannot be combined with --url" in mixed.output


def test_server_logs_hold_no_traceback(servers):
    for server in servers.values():
        assert "Traceback" not in server.log.read_text()


def test_sigterm_stops_an_idle_server_at_once(main):
    start = time.monotonic()
    assert main.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 10


# ------------------------------------------------------------------------------------------ in-process

def test_a_drain_deadline_fails_what_is_unfinished(rt):
    """The scheduler alone: after drain(timeout), new requests get 503 and, at the deadline, so does a request
    still decoding (its stream ends with the error; nothing hangs)."""
    import asyncio

    from mtp_runtime.params import DraftParams
    from mtp_runtime.sampling import SamplingParams
    from mtp_runtime.serve import ApiError
    from mtp_runtime.serve.job import DecodeSettings, Job
    from mtp_runtime.serve.metrics import ServeMetrics
    from mtp_runtime.serve.scheduler import Scheduler
    from mtp_runtime.serve.sequence import Failed, Submission, Tokens

    job = Job("completion", ((1, 2, 3),), 3000, DecodeSettings(SamplingParams(), DraftParams.build("none")),
              ignore_eos=True)

    async def scenario():
        scheduler = Scheduler(rt, 4, 4, ServeMetrics())
        scheduler.start()
        try:
            submission = Submission(job, rt.tokenizer, (), asyncio.get_running_loop())
            scheduler.submit(submission)
            assert isinstance(await asyncio.wait_for(submission.events.get(), 30), Tokens)
            scheduler.drain(0.2)
            with pytest.raises(ApiError) as refused:
                scheduler.submit(Submission(job, rt.tokenizer, (), asyncio.get_running_loop()))
            assert refused.value.status == 503
            events = [event async for event in submission.stream()]
            assert isinstance(events[-1], Failed) and events[-1].error.status == 503
            deadline = time.monotonic() + 10
            while not scheduler.idle and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert scheduler.idle and not scheduler.running_rows
        finally:
            scheduler.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))
