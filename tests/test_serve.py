"""Continuous batching (stbllm_rt._core.BatchEngine) and the OpenAI-compatible server (stbllm-serve): a live
uvicorn server on loopback driven by the official `openai` client, raw HTTP for the error cases."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import stbllm_rt
from stbllm_rt import _core

PROMPTS = ["The capital of France is", "Once upon a time there", "Hello", "Binary weights use one bit each, plus"]
SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.0, repetition_penalty=1.1)


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# ---- the engine ---------------------------------------------------------------------------------------------------

def run_batch(model, requests, max_batch, max_step_tokens=256, join_every=0, max_new_tokens=20):
    """Runs (id, prompt ids, seed) requests through a BatchEngine; join_every=k admits one waiting request every k
    steps (so requests join a running batch mid-generation). Returns ({id: tokens}, events per step)."""
    engine = _core.BatchEngine(model._model, max_batch, max_step_tokens)
    out = {rid: [] for rid, _, _ in requests}
    waiting, step, per_step = list(requests), 0, []
    while waiting or engine.active:
        while waiting and engine.active < max_batch and (join_every == 0 or step % join_every == 0):
            rid, prompt, seed = waiting.pop(0)
            engine.add(rid, prompt, max_new_tokens, seed=seed, stop_token_ids=[], **SAMPLING)
            if join_every:
                break
        events = engine.step()
        per_step.append(len(events))
        for rid, token, _ in events:
            out[rid].append(token)
        step += 1
    return out, per_step


@pytest.mark.parametrize("arch,method,nm", [("llama", "sign", "6:8"), ("mistral", "fp16", None)])
def test_batched_requests_match_alone(tiny_stb, arch, method, nm):
    """A seeded request gives the same tokens alone, beside others, joining a running batch, with its prompt
    prefilled in small chunks, and through Model.generate."""
    model = stbllm_rt.Model(tiny_stb(arch, method, nm), threads=2)
    requests = [(i, model.tokenize(p), 100 + i) for i, p in enumerate(PROMPTS)]
    alone = {rid: run_batch(model, [(rid, p, s)], 1)[0][rid] for rid, p, s in requests}
    together, per_step = run_batch(model, requests, 4)
    staggered, _ = run_batch(model, requests, 3, max_step_tokens=5, join_every=3)
    assert max(per_step) == 4  # the four requests really shared steps
    assert together == alone
    assert staggered == alone
    for rid, prompt, seed in requests:
        assert model.generate(prompt, max_new_tokens=20, seed=seed, stop_token_ids=[], **SAMPLING) == alone[rid]


def test_batch_engine_bounds_and_cancel(tiny_stb):
    model = stbllm_rt.Model(tiny_stb("llama"), threads=1)
    engine = _core.BatchEngine(model._model, 2)
    prompt = model.tokenize("Hello world")
    add = lambda rid, n=50: engine.add(rid, prompt, n, 0.0, 0, 1.0, 0.0, 1.0, 0, [])  # noqa: E731
    add(1)
    with pytest.raises(ValueError, match="already running"):
        add(1)
    add(2)
    with pytest.raises(ValueError, match="batch is full"):
        add(3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _core.BatchEngine(model._model, 1).add(9, prompt, 0, 0.0, 0, 1.0, 0.0, 1.0, 0, [])
    with pytest.raises(ValueError, match="context"):
        _core.BatchEngine(model._model, 1).add(9, [5] * 128, 1, 0.0, 0, 1.0, 0.0, 1.0, 0, [])
    assert [e[0] for e in engine.step()] == [1, 2]
    assert engine.cancel(1) and not engine.cancel(1)
    assert engine.active == 1
    add(3, n=2)  # the freed slot takes a new request
    assert [e[0] for e in engine.step()] == [2, 3]
    events = engine.step()
    assert (3, events[1][1], "length") == events[1] and engine.active == 1


def test_frequency_and_presence_penalties(tiny_stb):
    """Greedy decoding with OpenAI penalties picks, at every step, the argmax of the logits lowered by
    frequency * count + presence over the tokens generated so far (not the prompt)."""
    model = stbllm_rt.Model(tiny_stb("llama"), threads=1)
    prompt = model.tokenize("She sells sea shells")
    kwargs = dict(max_new_tokens=24, temperature=0, stop_token_ids=[])
    penalized = model.generate(prompt, frequency_penalty=1.5, presence_penalty=0.5, **kwargs)
    assert penalized != model.generate(prompt, **kwargs)
    for t, token in enumerate(penalized):
        logits = model.logits(prompt + penalized[:t])[-1].astype(np.float64)
        counts = np.bincount(penalized[:t], minlength=len(logits))
        logits -= 1.5 * counts + 0.5 * (counts > 0)
        assert token == int(np.argmax(logits))


def test_sampler_filters_without_top_k(tiny_stb):
    """With top_k off, top_p keeps the smallest highest-first prefix reaching the mass (the sampler sorts only as
    much as it needs, here more than its first 64) and min_p drops tokens below min_p x the most likely one."""
    model = stbllm_rt.Model(tiny_stb("llama"), threads=1)
    prompt = model.tokenize("The quick brown fox")
    logits = model.logits(prompt)[-1].astype(np.float64) / 2.0  # temperature 2: a flat distribution
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    nucleus = set(order[:int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1].tolist())
    assert len(nucleus) > 64
    batch = [prompt] * 300
    drawn = model.generate(batch, max_new_tokens=1, temperature=2.0, top_k=0, top_p=0.9, min_p=0.0, seed=0)
    assert {t[0] for t in drawn} <= nucleus and len({t[0] for t in drawn}) > 20
    drawn = model.generate(batch, max_new_tokens=1, temperature=2.0, top_k=0, top_p=1.0, min_p=0.5, seed=0)
    assert all(probs[t[0]] >= 0.5 * probs.max() * (1 - 1e-5) for t in drawn)


# ---- the server ---------------------------------------------------------------------------------------------------

class LiveServer:
    """stbllm-serve's app under uvicorn in a thread, on a loopback socket bound before the server starts."""

    def __init__(self, model_path, **settings):
        import uvicorn
        from stbllm_rt.serve import ServerSettings, create_app

        self.settings = ServerSettings(model_path=str(model_path), model_name="tiny", threads=1, **settings)
        self.app = create_app(self.settings)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")
        self.engine = self.app.state.server.engine
        self.model = self.app.state.server.model

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def metric(self, name: str) -> float:
        import httpx

        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class GatedBatch:
    """Wraps a server's C++ BatchEngine so a test decides when each step may run (deterministic races)."""

    def __init__(self, engine):
        self.inner = engine._batch
        self.permits = threading.Semaphore(0)
        self.open = False
        engine._batch = self

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self):
        if not self.open:
            self.permits.acquire()
        return self.inner.step()

    def release(self, steps=None):
        if steps is None:
            self.open = True
            steps = 1
        for _ in range(steps):
            self.permits.release()


API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_stb):
    live = LiveServer(tiny_stb("llama"), max_batch=4, max_queue=8, api_key=API_KEY)
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def expected(model, prompt, seed, max_tokens=24, **kwargs):
    return model.generate(prompt, max_new_tokens=max_tokens, temperature=0.8, top_k=0, top_p=1.0, min_p=0.0,
                          seed=seed, **kwargs)


def test_completion_matches_generate(server, client):
    response = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=24,
                                         temperature=0.8, seed=5)
    assert response.choices[0].text == expected(server.model, "The capital of France is", 5)
    assert response.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(server.model.tokenize("The capital of France is"))
    assert response.usage.prompt_tokens == prompt_tokens and 0 < response.usage.completion_tokens <= 24
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_uses_the_models_template(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0.8,
                                              seed=3)
    prompt = server.model.apply_chat_template(messages)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected(server.model, prompt, 3, 16)


def test_streaming_gives_the_same_text(server, client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0.8,
                                      seed=11).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                                            temperature=0.8, seed=11, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices

    messages = [{"role": "user", "content": "Tell me about rivers"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=2)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=2, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == whole.choices[0].message.content


def test_stop_strings_cut_the_text(server, client):
    full = expected(server.model, "Rivers flow to the sea", 8)
    stop = full[4:6]
    cut = full[:full.find(stop)]
    for stream in (False, True):
        response = client.completions.create(model="tiny", prompt="Rivers flow to the sea", max_tokens=24,
                                             temperature=0.8, seed=8, stop=[stop, "\u2603never"], stream=stream)
        if stream:
            chunks = list(response)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = response.choices[0].text, response.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt="Numbers like", max_tokens=24, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(21) == sample(21)
    assert sample(21) != sample(22)


def test_concurrent_requests_match_sequential(server):
    import openai

    async def one(aclient, i):
        response = await aclient.completions.create(model="tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=20,
                                                    temperature=0.8, seed=40 + i)
        return response.choices[0].text

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(6)))

    steps_before = server.metric("stbllm_batch_steps_total")
    concurrent = asyncio.run(all_at_once())
    sequential = [expected(server.model, PROMPTS[i % len(PROMPTS)], 40 + i, 20) for i in range(6)]
    assert concurrent == sequential
    assert server.metric("stbllm_batch_steps_total") > steps_before


def test_health_and_metrics(server, client):
    import httpx

    client.completions.create(model="tiny", prompt="Hello", max_tokens=4, seed=1)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    text = httpx.get(server.url + "/metrics").text
    for name in ("stbllm_requests_total", "stbllm_generated_tokens_total", "stbllm_prompt_tokens_total",
                 "stbllm_queue_depth", "stbllm_running_requests", "stbllm_time_to_first_token_seconds_count",
                 "stbllm_tokens_per_second"):
        assert name in text
    assert server.metric("stbllm_generated_tokens_total") >= 4
    assert server.metric("stbllm_time_to_first_token_seconds_count") >= 1


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": 42}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "fox " * 300}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
])
def test_bad_completion_requests(server, body, status, param):
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/completions", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    # ... and the server keeps serving.
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                    headers=headers)
    assert ok.status_code == 200


def test_bad_chat_requests(server):
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}"}
    for body, param in [({"model": "tiny", "messages": []}, "messages"),
                        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
                        ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 200}]}, "messages")]:
        response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_api_key(server):
    import httpx

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


@pytest.fixture
def gated_server(tiny_stb):
    """One request at a time, none queued, and the test holds the steps."""
    live = LiveServer(tiny_stb("llama"), max_batch=1, max_queue=0)
    gate = GatedBatch(live.engine)
    yield live, gate
    gate.release()
    live.close()


def test_full_queue_answers_429_and_disconnect_frees_the_slot(gated_server):
    import httpx

    live, gate = gated_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100, "stream": True}
    with httpx.Client(base_url=live.url) as first, first.stream("POST", "/v1/chat/completions", json=body) as stream:
        assert stream.status_code == 200
        wait_for(lambda: live.engine.running == 1, "the first request to join the batch")
        busy = httpx.post(live.url + "/v1/chat/completions", json=body)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        opening = next(line for line in stream.iter_lines() if line.startswith("data:"))
        assert json.loads(opening[5:])["choices"][0]["delta"]["role"] == "assistant"
    # The client has gone: the server cancels the request and frees its KV slot.
    wait_for(lambda: live.engine._to_cancel or live.engine.running == 0, "the cancellation to arrive")
    gate.release()
    wait_for(lambda: live.engine.running == 0 and gate.inner.active == 0, "the slot to be freed")
    wait_for(lambda: live.metric('stbllm_requests_total{outcome="cancelled"}') == 1, "the cancel to be counted")
    assert live.metric('stbllm_requests_total{outcome="rejected"}') == 1
    ok = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_request_timeout(gated_server):
    import httpx

    live, gate = gated_server
    live.settings.timeout = 0.3
    response = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "Hello"})
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    gate.release()
    wait_for(lambda: live.engine.running == 0 and gate.inner.active == 0, "the timed-out request to leave")
    assert live.metric('stbllm_requests_total{outcome="timeout"}') == 1


def test_ray_serve_two_replicas(tiny_stb):
    """The same app as a Ray Serve deployment with 2 replicas on a local Ray instance bound to 127.0.0.1."""
    ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra (pip install 'stbllm[serve]')")
    import httpx
    from ray import serve
    import yaml
    from stbllm_rt.serve.ray_app import DEPLOYMENT_NAME, build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tiny_stb("llama")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # The documented serve.yaml's application, on this test's model.
        config = yaml.safe_load((Path(stbllm_rt.__file__).parent / "serve" / "serve.yaml").read_text())
        args = {**config["applications"][0]["args"], "model": str(path), "model_name": "tiny", "threads": 1}
        assert args["replicas"] == 2
        serve.run(build(args), name=DEPLOYMENT_NAME, route_prefix="/")
        replicas = serve.status().applications[DEPLOYMENT_NAME].deployments[DEPLOYMENT_NAME].replica_states
        assert replicas.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0.8, "seed": 4}
        texts = {httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"] for _ in range(4)}
        assert texts == {expected(stbllm_rt.Model(path, threads=1), "Hello", 4, 8)}
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(line[5:])["choices"][0]["text"] for line in lines[:-1]) == texts.pop()
        assert httpx.post(url, json={"model": "tiny", "prompt": 1.5}, timeout=60).status_code == 400
    finally:
        serve.shutdown()
        ray.shutdown()


def test_cli_refuses_bad_options(tiny_stb, capsys):
    from stbllm_rt.serve.cli import main

    assert main(["/nonexistent/model.stb"]) == 2
    assert main([str(tiny_stb("llama")), "--max-batch", "0"]) == 2
    assert main([str(tiny_stb("llama")), "--timeout", "0"]) == 2
    err = capsys.readouterr().err
    assert "no such model file" in err and "--max-batch must be >= 1" in err and "--timeout > 0" in err
