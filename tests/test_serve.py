"""The server: engine steps, batching invariance, streams, bad input and load, on loopback.

Two tiny random checkpoints (a masked-diffusion and a causal transformer with a char tokenizer)
are served in float64, so batch composition cannot flip an argmax and "alone == batched" is exact.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from difflm.sampling.autoregressive import generate_ar  # noqa: E402
from difflm.sampling.unmask import SampleConfig, generate, generate_steps  # noqa: E402
from difflm.serve.app import build_app, serve_in_thread  # noqa: E402
from difflm.serve.batcher import Batcher, Job  # noqa: E402
from difflm.serve.models import load_served  # noqa: E402
from difflm.serve.protocol import Defaults, parse_request  # noqa: E402

from .serve_fixtures import tiny_checkpoint  # noqa: E402

TIMEOUT = 30


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    mdm = load_served(tiny_checkpoint(root / "mdm"), dtype="float64", name="mdm")
    ar = load_served(tiny_checkpoint(root / "ar", causal=True, seed=1), dtype="float64", name="ar")
    return [mdm, ar]


@pytest.fixture(scope="module")
def server(models):
    app = build_app(models, Defaults(max_tokens=16, block_length=8), max_batch=16, max_queue=64)
    running = serve_in_thread(app)
    running.app = app
    yield running
    running.stop()


def post(url: str, path: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream(url: str, path: str, body: dict) -> list[dict]:
    """The server-sent events of a streamed request, up to [DONE] (which must come last)."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.read().decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def text_of(reply: dict) -> str:
    return reply["choices"][0]["text"]


# ----------------------------------------------------------------------------- engine step API


def test_generate_steps_yields_every_step_and_returns_what_generate_does(mock_denoiser) -> None:
    model = mock_denoiser(vocab=32, seed=3)
    prompt = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(0))
    cfg = SampleConfig(gen_length=12, steps=6, block_length=4, temperature=1.0)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    steps, seen = generate_steps(model, prompt, cfg, generator=gens()), torch.zeros(3, 17, dtype=torch.long)
    events = []
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            result = done.value
            break
        events.append((step.block, step.step))
        seen += step.changed.long()
    assert events == [(b, s) for b in range(3) for s in range(2)]  # 6 steps over 3 blocks of 4
    assert torch.equal(result.tokens, generate(model, prompt, cfg, generator=gens()).tokens)
    assert torch.equal(seen[:, 5:], torch.ones(3, 12, dtype=torch.long))  # keep mode: each once
    assert not seen[:, :5].any() and torch.is_grad_enabled()  # no_grad does not leak out


# ----------------------------------------------------------------------------- batching


def _jobs(models, bodies):
    out, jobs = {}, []
    for i, body in enumerate(bodies):
        req = parse_request(body, {m.name: m for m in models}, False, Defaults(16, 8))
        jobs.append(Job(req, lambda e, i=i: out.setdefault(i, []).append(e)))
    return jobs, out


@pytest.mark.parametrize("name", ["mdm", "ar"])
def test_one_cohort_equals_each_request_alone_and_the_engine(models, name) -> None:
    prompts = ["hello", "a", "the quick brown", "xyz"]
    bodies = [
        {"model": name, "prompt": p, "seed": 10 + i, "temperature": 1.0, "max_tokens": 12}
        for i, p in enumerate(prompts)
    ]
    batcher = Batcher()
    jobs, out = _jobs(models, bodies)
    for job in jobs:  # all queued before the loop starts: one cohort of 4 rows
        batcher.submit(job)
    batcher.start()
    _wait(lambda: len(out) == 4 and all(e[-1]["type"] == "done" for e in out.values()))
    batched_steps = batcher.steps_run
    batcher.stop()
    served = models[0] if name == "mdm" else models[1]
    for i, body in enumerate(bodies):
        ids = torch.tensor([served.tokenizer.encode(body["prompt"])])
        gen = [torch.Generator().manual_seed(body["seed"])]
        if name == "mdm":
            cfg = jobs[i].req.cfg
            tokens = generate(served.pre.model, ids, cfg, generator=gen).tokens
        else:
            tokens = generate_ar(
                served.pre.model, ids, max_new_tokens=12, temperature=1.0, generator=gen
            ).tokens
        alone = served.tokenizer.decode(tokens[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        assert out[i][-1]["text"] == alone and len(alone) == 12
    assert batched_steps <= 12 + 1  # 12 batched steps (+ the last, empty one), not 4 x 12


def test_batches_with_different_settings_share_forward_passes(models) -> None:
    """Two cohorts (12 steps and 4 steps) run as 12 fused passes, not 16; a request that arrives
    mid-run joins the running passes; every output equals the request alone."""
    a = {
        "model": "mdm",
        "prompt": "hello",
        "seed": 1,
        "temperature": 1.0,
        "max_tokens": 12,
        "block_length": 4,
    }
    b = {"model": "mdm", "prompt": "hi", "seed": 2, "max_tokens": 8, "steps": 4, "block_length": 8}
    c = {"model": "mdm", "prompt": "abc", "seed": 3, "max_tokens": 4, "steps": 2, "block_length": 4}
    alone = [_alone(models, body) for body in (a, b, c)]
    batcher = Batcher()
    jobs, out = _jobs(models, [a, b, c])
    batcher.submit(jobs[0])
    batcher.submit(jobs[1])
    batcher.start()
    _wait(lambda: any(e["type"] == "text" for e in out.get(0, [])))  # a is under way
    batcher.submit(jobs[2])
    _wait(lambda: len(out) == 3 and all(e[-1]["type"] == "done" for e in out.values()))
    passes = batcher.forward_passes
    batcher.stop()
    assert [out[i][-1]["text"] for i in range(3)] == alone
    assert passes < 12 + 4 + 2 and passes >= 12


@pytest.mark.parametrize("cache", ["prefix", "dual", "delayed"])
def test_kv_cache_requests_match_the_engine_while_other_batches_run(server, models, cache) -> None:
    body = {
        "model": "mdm",
        "prompt": "hello",
        "seed": 4,
        "temperature": 1.0,
        "max_tokens": 16,
        "block_length": 4,
    }
    other = threading.Thread(target=post, args=(server.url, "/v1/completions", {**body, "seed": 5}))
    other.start()  # a cache-free batch in flight at the same time
    status, reply = post(server.url, "/v1/completions", {**body, "cache": cache})
    other.join(TIMEOUT)
    served = models[0]
    ids = torch.tensor([served.tokenizer.encode("hello")])
    cfg = parse_request({**body, "cache": cache}, {"mdm": served}, False, Defaults()).cfg
    tokens = generate(served.pre.model, ids, cfg, generator=[torch.Generator().manual_seed(4)]).tokens
    assert status == 200 and text_of(reply) == served.tokenizer.decode(tokens[0, 5:].tolist())


def _alone(models, body) -> str:
    batcher = Batcher()
    jobs, out = _jobs(models, [body])
    batcher.submit(jobs[0])
    batcher.start()
    _wait(lambda: out.get(0) and out[0][-1]["type"] == "done")
    batcher.stop()
    return out[0][-1]["text"]


def _wait(cond, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_requests_equal_alone_no_mixup(server) -> None:
    """A small load test: 12 concurrent requests, mixed prompts, lengths, settings, streaming."""
    bodies = [
        {
            "model": "mdm" if i % 3 else "ar",
            "prompt": "abc def ghi"[: 1 + i % 9],
            "seed": 100 + i,
            "temperature": [0.0, 0.7, 1.0][i % 3],
            "max_tokens": [8, 12, 16][i % 3],
            "block_length": 4,
            "steps": [8, 6, 16][i % 3],
        }
        for i in range(12)
    ]
    alone = [text_of(post(server.url, "/v1/completions", b)[1]) for b in bodies]
    results: dict[int, str] = {}

    def call(i: int) -> None:
        if i % 2:
            events = stream(server.url, "/v1/completions", bodies[i])
            results[i] = "".join(e["choices"][0]["text"] for e in events)
        else:
            results[i] = text_of(post(server.url, "/v1/completions", bodies[i])[1])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert [results[i] for i in range(12)] == alone


# ----------------------------------------------------------------------------- streams


def test_stream_text_and_denoise_steps_rebuild_the_reply(server) -> None:
    body = {
        "model": "mdm",
        "prompt": "hi",
        "seed": 7,
        "temperature": 1.0,
        "max_tokens": 12,
        "steps": 6,
        "block_length": 6,
    }
    whole = text_of(post(server.url, "/v1/completions", body)[1])
    events = stream(server.url, "/v1/completions", {**body, "stream_denoise": True})
    assert "".join(e["choices"][0]["text"] for e in events) == whole
    steps = [e["choices"][0]["denoise"] for e in events if "denoise" in e["choices"][0]]
    assert [(s["block"], s["step"]) for s in steps] == [(b, s) for b in range(2) for s in range(3)]
    canvas = [None] * 12
    for s in steps:
        for pos, _, text in s["revealed"]:
            assert canvas[pos] is None  # keep mode: a position is revealed once
            canvas[pos] = text
    assert "".join(canvas) == whole
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completion_shapes(server) -> None:
    body = {
        "model": "mdm",
        "messages": [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}],
        "seed": 1,
    }
    status, reply = post(server.url, "/v1/chat/completions", {**body, "max_tokens": 6})
    assert status == 200 and reply["object"] == "chat.completion"
    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant" and len(message["content"]) == 6
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    events = stream(server.url, "/v1/chat/completions", {**body, "max_tokens": 6})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]


def test_stop_string_truncates_and_finishes(server) -> None:
    body = {"model": "mdm", "prompt": "hello", "seed": 3, "temperature": 1.0, "max_tokens": 16}
    full = text_of(post(server.url, "/v1/completions", body)[1])
    stop = full[5:7]
    status, reply = post(server.url, "/v1/completions", {**body, "stop": [stop, "??"]})
    assert status == 200 and text_of(reply) == full[: full.find(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"
    events = stream(server.url, "/v1/completions", {**body, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events) == full[: full.find(stop)]


def test_models_route(server) -> None:
    with urllib.request.urlopen(server.url + "/v1/models", timeout=TIMEOUT) as r:
        data = json.loads(r.read())["data"]
    assert [(m["id"], m["kind"], m["max_length"]) for m in data] == [
        ("mdm", "diffusion", 48),
        ("ar", "autoregressive", 48),
    ]


# ----------------------------------------------------------------------------- bad input


BAD = [
    ({"prompt": "hi"}, 400, "model"),  # two models served: model is required
    ({"model": "mdm"}, 400, "prompt"),
    ({"model": "mdm", "prompt": 5}, 400, "prompt"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "mdm", "prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": "mdm", "prompt": "hi", "max_tokens": 47}, 400, "max_tokens"),  # 2 + 47 > 48
    ({"model": "mdm", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "mdm", "prompt": "a" * 48}, 400, "prompt"),  # no room left
    ({"model": "mdm", "prompt": "HI"}, 400, "prompt"),  # not in the char vocabulary
    ({"model": "mdm", "prompt": "hi", "temperature": True}, 400, "temperature"),
    ({"model": "mdm", "prompt": "hi", "temperature": -1}, 400, None),
    ({"model": "mdm", "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ({"model": "mdm", "prompt": "hi", "steps": 99, "max_tokens": 8}, 400, None),
    ({"model": "mdm", "prompt": "hi", "cache": "huge"}, 400, "cache"),
    ({"model": "mdm", "prompt": "hi", "stop": [1]}, 400, "stop"),
    ({"model": "mdm", "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": "mdm", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ([1, 2], 400, None),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_a_4xx_json_error_and_the_server_serves_on(server, body, status, param) -> None:
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    got, reply = post(server.url, path, body)
    assert got == status and reply["error"]["code"] == status and reply["error"]["message"]
    assert reply["error"]["param"] == param
    assert post(server.url, "/v1/completions", {"model": "mdm", "prompt": "hi", "max_tokens": 4})[0] == 200


def test_malformed_json_and_unknown_route(server) -> None:
    status, reply = post(server.url, "/v1/completions", None, raw=b'{"model": "mdm", "prompt": ')
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = post(server.url, "/v1/nothing", {})
    assert status == 404 and reply["error"]["code"] == 404


def test_client_disconnect_mid_stream_frees_the_request(server) -> None:
    batcher = server.app.state.server.batcher
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    body = {
        "model": "mdm",
        "prompt": "hi",
        "max_tokens": 40,
        "block_length": 40,
        "stream": True,
        "stream_denoise": True,
    }
    conn.request("POST", "/v1/completions", json.dumps(body))
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.close()  # gone after the first event
    _wait(lambda: batcher.in_flight == 0)
    assert post(server.url, "/v1/completions", {"model": "mdm", "prompt": "hi", "max_tokens": 4})[0] == 200


def test_queue_cap_answers_429(server) -> None:
    batcher = server.app.state.server.batcher
    _wait(lambda: batcher.in_flight == 0)
    with batcher._cv:
        batcher.in_flight += batcher.max_queue  # as if the queue were full
    try:
        status, reply = post(server.url, "/v1/completions", {"model": "mdm", "prompt": "hi"})
        assert status == 429 and reply["error"]["type"] == "rate_limit_exceeded"
    finally:
        with batcher._cv:
            batcher.in_flight -= batcher.max_queue
    assert post(server.url, "/v1/completions", {"model": "mdm", "prompt": "hi", "max_tokens": 4})[0] == 200


def test_real_overload_refuses_some_and_serves_the_rest(models) -> None:
    running = serve_in_thread(build_app(models[:1], Defaults(max_tokens=40, block_length=40), max_queue=2))
    try:
        statuses: list[int] = []
        body = {"prompt": "hi", "max_tokens": 40, "steps": 40}
        threads = [
            threading.Thread(target=lambda: statuses.append(post(running.url, "/v1/completions", body)[0]))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert len(statuses) == 8 and set(statuses) <= {200, 429} and 200 in statuses
    finally:
        running.stop()


def test_load_served_refuses_an_unknown_dtype(tmp_path: Path) -> None:
    from difflm.errors import DifflmError

    with pytest.raises(DifflmError, match="--dtype"):
        load_served(tiny_checkpoint(tmp_path / "m"), dtype="float16")
