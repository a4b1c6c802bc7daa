"""The embedded OpenAI-compatible server, driven by the stock `openai` client on a tiny Llama."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.conftest_serve import make_adapter, peft_greedy  # noqa: E402
from tests.tolerance import assert_close, bound, rel_diff, rounding_eps  # noqa: E402
from tunekit import ConfigError  # noqa: E402

KEY = "test-key"
PROMPTS = ["Hello there", "The quick brown fox"]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # different ranks and targets: slots pad r=4 up to 16 and cover the union of modules
        "sql": make_adapter(tiny_model, root / "sql", r=4, target_modules=("q_proj", "v_proj"), seed=1),
        "poem": make_adapter(tiny_model, root / "poem", r=16, target_modules="all-linear", seed=2,
                             use_rslora=True, alpha_pattern={"down_proj": 8}),
    }


@pytest.fixture(scope="module")
def server(tiny_model, adapters):
    from tunekit.serve.embedded import start_in_thread

    handle = start_in_thread(str(tiny_model), {k: str(v) for k, v in adapters.items()}, api_key=KEY, max_loras=2,
                             batch_window_ms=0)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_model, adapters) -> dict[tuple[str | None, str], str]:
    """Greedy outputs of transformers/PEFT, one request at a time: what every path must reproduce."""
    return {(name, p): peft_greedy(tiny_model, adapters.get(name), p, 8)
            for name in (None, "sql", "poem") for p in PROMPTS}


def _complete(client, model: str, prompt: str, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, **kw)


def test_outputs_equal_peft_for_base_and_each_adapter(client, tiny_model, reference):
    base = str(tiny_model)
    for p in PROMPTS:
        got = {name: _complete(client, name or base, p).choices[0].text for name in (None, "sql", "poem")}
        for name, text in got.items():
            assert text == reference[(name, p)], (name, p)
        # the adapters really change the model, and differently
        assert len(set(got.values())) == 3


def test_models_list_and_usage(client, tiny_model):
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(tiny_model), "sql", "poem"]
    r = _complete(client, "sql", PROMPTS[0])
    assert r.object == "text_completion" and r.model == "sql"
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    from transformers import AutoTokenizer

    assert r.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(tiny_model)(PROMPTS[0])["input_ids"])


def test_streaming_matches_non_streaming(client, reference):
    chunks = list(_complete(client, "poem", PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference[("poem", PROMPTS[1])]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_and_chat_streaming(client, tiny_model):
    msgs = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="sql", messages=msgs, max_tokens=6, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    # the chat template was applied: same as a raw completion of the rendered prompt
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(msgs, tokenize=False,
                                                                             add_generation_prompt=True)
    raw = client.completions.create(model="sql", prompt=rendered, max_tokens=6, temperature=0)
    assert full.choices[0].message.content == raw.choices[0].text
    stream = list(client.chat.completions.create(model="sql", messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in stream)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_concurrent_requests_for_different_adapters_share_one_batch(client, server, tiny_model, reference):
    engine = server.engine
    jobs = [(name or str(tiny_model), name, p) for name in (None, "sql", "poem") for p in PROMPTS]
    results: dict[int, object] = {}

    def call(i: int, model: str, prompt: str) -> None:
        results[i] = _complete(client, model, prompt)

    with engine.paused():  # line all six requests up, then let the scheduler take them together
        threads = [threading.Thread(target=call, args=(i, m, p)) for i, (m, _, p) in enumerate(jobs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while engine.pending() < len(jobs):
            assert time.monotonic() < deadline, "requests did not reach the engine"
            time.sleep(0.01)
        slots = engine.pool.slots
        shared_before = slots.shared_shrinks
    for t in threads:
        t.join(60)
    # the mixed batch took the grouped shrink: k/v (after q) and up (after gate) reused their sibling's bmm,
    # in every layer of every mixed forward
    per_forward = sum(len(g) - 1 for g in slots.shrink_groups)
    shared = slots.shared_shrinks - shared_before
    assert per_forward == 3 * 2 and shared >= per_forward and shared % per_forward == 0
    ids = {results[i].id for i in range(len(jobs))}
    stats = httpx.get(server.url + "/tunekit/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    batch = next(b for b in reversed(stats["recent_batches"]) if set(b["request_ids"]) & ids)
    assert set(b for b in batch["request_ids"]) == ids  # all six in ONE batched decode
    assert stats["adapters"]["shared_shrinks"] == slots.shared_shrinks >= shared  # the counter is served too
    assert batch["size"] == 6 and batch["models"] == ["__base__", "poem", "sql"]
    for i, (_, name, p) in enumerate(jobs):  # and each row still got its own adapter
        assert results[i].choices[0].text == reference[(name, p)], (name, p)


def test_stop_sequences_truncate_also_when_streaming(client, reference):
    full = reference[("sql", PROMPTS[0])]
    stop = full[3:5]
    cut = full[:full.find(stop)]
    r = _complete(client, "sql", PROMPTS[0], stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in _complete(client, "sql", PROMPTS[0], stop=stop, stream=True))
    assert streamed == cut


def test_sampling_is_seeded_and_respects_top_p(client):
    kw = {"max_tokens": 12, "temperature": 1.0, "seed": 7}
    a = client.completions.create(model="poem", prompt="x", **kw).choices[0].text
    b = client.completions.create(model="poem", prompt="x", **kw).choices[0].text
    assert a == b
    greedy = client.completions.create(model="poem", prompt="x", max_tokens=12, temperature=0).choices[0].text
    tiny_p = client.completions.create(model="poem", prompt="x", top_p=1e-6, **kw).choices[0].text
    assert tiny_p == greedy  # top_p -> 0 keeps only the most likely token


def test_hot_load_unload_and_access_rules(client, server, adapters, tiny_model, tmp_path, reference):
    h = {"Authorization": f"Bearer {KEY}"}
    post = lambda path, body: httpx.post(server.url + path, json=body, headers=h)  # noqa: E731
    r = post("/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' removed successfully."
    with pytest.raises(openai.NotFoundError) as err:
        _complete(client, "sql", PROMPTS[0])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert "sql" not in [m.id for m in client.models.list().data]
    assert post("/v1/unload_lora_adapter", {"lora_name": "sql"}).status_code == 404
    # a path that was not given at start nor registered: refused, whatever it holds
    other = make_adapter(tiny_model, tmp_path / "other", seed=9)
    r = post("/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(other)})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    # back by name (known from start), and the same weights under a second name
    r = post("/v1/load_lora_adapter", {"lora_name": "sql"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' added successfully."
    assert post("/v1/load_lora_adapter", {"lora_name": "sql2", "lora_path": str(adapters["sql"])}).status_code == 200
    assert _complete(client, "sql2", PROMPTS[0]).choices[0].text == reference[("sql", PROMPTS[0])]
    r = post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters["sql"])})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    assert post("/v1/unload_lora_adapter", {"lora_name": "sql2"}).status_code == 200
    assert _complete(client, "sql", PROMPTS[0]).choices[0].text == reference[("sql", PROMPTS[0])]


def test_registry_adapters_can_be_loaded(client, server, tiny_model, tmp_path):
    from tunekit.store import default_store

    path = make_adapter(tiny_model, tmp_path / "registered", seed=5)
    default_store().add_adapter(backend="local", location=str(path), info={}, name="registered-one")
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "reg", "lora_path": str(path)},
                   headers=h)
    assert r.status_code == 200, r.text
    assert _complete(client, "reg", "hi").choices[0].text == peft_greedy(tiny_model, path, "hi", 8)
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "registered-one"}, headers=h)
    assert r.status_code == 200, r.text  # by registry name alone
    for name in ("reg", "registered-one"):
        httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=h)


def test_errors_are_openai_shaped_and_server_keeps_serving(client, server, reference):
    h = {"Authorization": f"Bearer {KEY}"}
    url = server.url
    assert httpx.get(url + "/health").status_code == 200  # open without a key
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/completions", json={"model": "sql"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url + "/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": -1}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="sql", prompt="x", logprobs=2)
    assert err.value.body["param"] == "logprobs"  # refused, never silently ignored
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="sql", prompt="x", max_tokens=5000)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=r"token ids must be in"):
        client.completions.create(model="sql", prompt=[1, 2, 10**6], max_tokens=2)
    ids = client.completions.create(model="sql", prompt=[1, 70, 71], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3
    with pytest.raises(openai.NotFoundError):
        _complete(client, "no-such-adapter", "x")
    assert httpx.get(url + "/v1/nothing-here", headers=h).json()["error"]["message"] == "Not Found"
    assert _complete(client, "poem", PROMPTS[0]).choices[0].text == reference[("poem", PROMPTS[0])]


def test_lru_with_one_slot_still_serves_every_adapter_correctly(tiny_model, adapters, reference):
    from tunekit.serve.embedded import start_in_thread

    with start_in_thread(str(tiny_model), {k: str(v) for k, v in adapters.items()}, max_loras=1) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        for name in ("sql", "poem", "sql", None, "poem"):
            got = _complete(c, name or str(tiny_model), PROMPTS[0]).choices[0].text
            assert got == reference[(name, PROMPTS[0])], name
        # two adapters queued together with one slot: served in two batches, both right
        results = {}
        with srv.engine.paused():
            ts = [threading.Thread(target=lambda n=n: results.__setitem__(n, _complete(c, n, PROMPTS[1])))
                  for n in ("sql", "poem")]
            for t in ts:
                t.start()
            while srv.engine.pending() < 2:
                time.sleep(0.01)
        for t in ts:
            t.join(60)
        for n in ("sql", "poem"):
            assert results[n].choices[0].text == reference[(n, PROMPTS[1])]
        stats = srv.engine.stats()
        assert stats["adapters"]["evictions"] >= 4 and stats["adapters"]["resident"] in ({"sql": 1}, {"poem": 1})
        assert all(len([m for m in b["models"] if m != "__base__"]) <= 1 for b in stats["recent_batches"])


def test_unservable_adapters_are_refused(tiny_model, adapters, tmp_path, server):
    from tunekit.serve.embedded import create_app

    mts = make_adapter(tiny_model, tmp_path / "mts", modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save") as err:
        create_app(str(tiny_model), {"d": str(mts)})
    assert "tunekit merge" in err.value.hint
    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        create_app(str(tiny_model), {"x": str(tmp_path)})


def _random_slots(tiny_model, num_slots: int = 3, rank: int = 4, dora: bool = False, bias: bool = False):
    """The tiny Llama with every linear layer (but lm_head) in random LoRA slots (with DoRA gains: ``dora``; with
    random biases on the attention projections, as Qwen2 has on q/k/v: ``bias``)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from tunekit.serve.embedded.lora_slots import LoraSlots, SlotLayout

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    if bias:
        gen = torch.Generator().manual_seed(9)
        for layer in model.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(layer.self_attn, proj)
                lin.bias = nn.Parameter(torch.randn(lin.out_features, generator=gen) * 0.1)
    mods = tuple(sorted((n, m.in_features, m.out_features) for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and n != "lm_head"))
    slots = LoraSlots(model, num_slots, device=torch.device("cpu"), dtype=torch.float32)
    slots.apply_layout(SlotLayout(rank=rank, modules=mods, dora=dora))
    slots.storage[1:].copy_(torch.randn(slots.storage[1:].shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    if dora:  # every slot is a DoRA adapter (its gains g - 1 are the random tail of the slot)
        slots._dora_slots.update(range(1, num_slots + 1))
    return model, slots


def test_mixed_batch_grouped_shrink_equals_each_row_alone(tiny_model):
    import torch

    model, slots = _random_slots(tiny_model)
    layers = model.config.num_hidden_layers
    assert sorted(map(tuple, slots.shrink_groups)) == sorted(
        g for i in range(layers) for g in (
            tuple(f"model.layers.{i}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")),
            tuple(f"model.layers.{i}.mlp.{m}" for m in ("gate_proj", "up_proj"))))  # o_proj, down_proj alone
    rows = [1, 2, 0, 3, 1]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 200, (len(rows), 6), generator=gen)
    nxt = torch.randint(10, 200, (len(rows), 1), generator=gen)

    def run(slot_rows, prompt, token):  # prefill + one cached decode step
        slots.set_rows(slot_rows)
        with torch.inference_mode():
            out = model(input_ids=prompt, use_cache=True)
            step = model(input_ids=token, cache=out.past_key_values)
        return torch.cat([out.logits, step.logits], dim=1)

    before = slots.shared_shrinks
    mixed = run(rows, ids, nxt)
    assert slots.shared_shrinks - before == 2 * 3 * layers  # k, v, up reused the group's bmm in both forwards
    # fp32 both ways, in another order (bmm vs matmul + addmm): fp32 rounding of the model's longest sums
    eps = rounding_eps("float32", model.config.intermediate_size)
    for i, slot in enumerate(rows):  # each row alone: the single-adapter (matmul + addmm) or base path
        alone = run([slot], ids[i:i + 1], nxt[i:i + 1])
        assert_close(mixed[i:i + 1], alone, eps, what=f"row {i}")
    base = run([0], ids[:1], nxt[:1])
    assert rel_diff(mixed[:1], base) > bound(eps, 1.0)  # the adapters really change the logits


def test_group_members_given_different_inputs_compute_their_own_shrink(tiny_model):
    import gc
    import weakref

    import torch
    import torch.nn.functional as F

    model, slots = _random_slots(tiny_model)
    rows = [2, 0, 1, 3]
    slots.set_rows(rows)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    sel = torch.tensor(rows)

    def reference(w, x):  # per row: base layer + x A_slot^T B_slot^T (B already holds the scaling)
        xb = x.reshape(len(rows), -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xb, w.A[sel].transpose(1, 2)), w.BT[sel]).reshape(*x.shape[:-1], -1)
        return F.linear(x, w.weight, w.bias) + delta

    gen = torch.Generator().manual_seed(3)
    x1, x2, x3 = (torch.randn(len(rows), 3, q.in_features, generator=gen) for _ in range(3))
    calls = [(q, x1), (k, x2), (v, x1), (v, x3), (k, x1), (q, x2), (q, x2), (k, x3),  # interleaved inputs
             (v, x2), (k, x2), (q, x2),  # the usual round, in reverse order
             (q, x1.reshape(-1, q.in_features))]  # [batch*tokens, features] input
    shared = []
    eps = rounding_eps("float32", q.in_features)  # one linear layer in fp32, summed in another order
    with torch.inference_mode():
        for w, x in calls:
            before = slots.shared_shrinks
            assert_close(w(x), reference(w, x), eps)
            shared.append(slots.shared_shrinks - before)
    # only a member called with the very tensor its group's bmm used reads the shared result
    assert shared == [0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0]
    slots.set_rows(rows)  # re-gather outside inference mode (inference tensors cannot be saved for backward)
    with torch.enable_grad():  # autograd path (no in-place expand) agrees too
        x = x2.clone().requires_grad_()
        for w in (q, k, v):
            assert_close(w(x), reference(w, x), eps)
    # a finished round holds no activation: the input is freed once every member has used it
    x = torch.randn(len(rows), 1, q.in_features)
    ref = weakref.ref(x)
    with torch.inference_mode():
        for w in (q, k, v):
            w(x)
    del x
    gc.collect()
    assert ref() is None


# -- isolation: one request never fails another ----------------------------------------------------------------

def _post(server, path: str, body: dict, timeout: float = 60):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def test_hostile_sampling_params_get_a_400_and_their_batch_is_served(server, tiny_model, reference):
    engine = server.engine
    valid = [("sql", PROMPTS[0]), ("poem", PROMPTS[1]), (None, PROMPTS[0])]
    hostile = [({"temperature": 1e-40}, "temperature"), ({"temperature": 1.0, "seed": 1180591620717411303424}, "seed")]
    results: dict[int, object] = {}

    def call(i: int, body: dict) -> None:
        results[i] = _post(server, "/v1/completions", {"max_tokens": 8, "temperature": 0, **body})

    bodies = [{"model": m or str(tiny_model), "prompt": p} for m, p in valid]
    bodies += [{"model": "sql", "prompt": PROMPTS[0], **extra} for extra, _ in hostile]
    with engine.paused():  # everything that reaches the engine goes into one batch
        threads = [threading.Thread(target=call, args=(i, b)) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not (engine.pending() == len(bodies)
                   or (engine.pending() == len(valid) and all(i in results for i in (3, 4)))):
            assert time.monotonic() < deadline, "requests did not arrive"
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    for i, (name, p) in enumerate(valid):
        assert results[i].status_code == 200, results[i].text
        assert results[i].json()["choices"][0]["text"] == reference[(name, p)]
    for i, (_, param) in enumerate(hostile, start=len(valid)):
        err = results[i].json()["error"]
        assert results[i].status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"


def test_a_row_whose_sampling_fails_in_the_engine_fails_alone(server, reference):
    """Past the HTTP checks (Engine API), a row that cannot be sampled gets an error; its batch goes on."""
    from tunekit.serve.embedded.requests import GenRequest, SamplingParams

    engine = server.engine
    events: dict[int, list] = {0: [], 1: [], 2: []}
    done = threading.Semaphore(0)

    def sink(i: int, kind: str, payload) -> None:
        events[i].append((kind, payload))
        if kind != "delta":
            done.release()

    ids = engine.encode(PROMPTS[0])
    params = [SamplingParams(max_tokens=8, temperature=0), SamplingParams(max_tokens=8, temperature=1e-40),
              SamplingParams(max_tokens=8, temperature=1.0, seed=2**70)]
    failed_batches = engine.stats().get("failed_batches", 0)
    with engine.paused():
        for i, p in enumerate(params):
            engine.submit(GenRequest(ids, "sql", p, sink, index=i))
    for _ in params:
        assert done.acquire(timeout=60)
    assert "".join(x for k, x in events[0] if k == "delta") == reference[("sql", PROMPTS[0])]
    assert events[0][-1] == ("done", ("length", 8))
    assert events[1][-1][0] == "error" and "sampling failed (temperature=1e-40" in events[1][-1][1]
    assert events[2][-1][0] == "error" and "invalid seed" in events[2][-1][1]
    assert engine.stats().get("failed_batches", 0) == failed_batches


def test_huge_prompt_is_refused_before_tokenizing_and_tokenizing_is_off_the_event_loop(server, monkeypatch):
    engine = server.engine
    seen: list[tuple[int, str]] = []
    encode = engine.encode

    def spy(text: str) -> list[int]:
        seen.append((len(text), threading.current_thread().name))
        return encode(text)

    monkeypatch.setattr(engine, "encode", spy)
    huge = "a" * 10_000_000
    result: dict[str, object] = {}
    sender = threading.Thread(target=lambda: result.setdefault("r", _post(server, "/v1/completions",
                                                                          {"model": "sql", "prompt": huge})))
    sender.start()
    slowest = 0.0
    while sender.is_alive():  # /health keeps answering while the 10 MB request is handled
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
    r = result["r"]
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "prompt"
    assert len(huge) > engine.max_prompt_chars and all(n < len(huge) for n, _ in seen)  # never tokenized
    assert slowest < 5.0  # generous on a loaded CI machine: the regression was the whole tokenization (seconds)
    r = _post(server, "/v1/completions", {"model": "sql", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200 and seen[-1][0] == len("hello")
    assert seen[-1][1] != "tunekit-embedded-http"  # tokenized on a worker thread, not on the event loop
    r = _post(server, "/v1/chat/completions", {"model": "sql", "messages": [{"role": "user", "content": huge}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_prompt_lists_count_toward_the_row_limit(server, client):
    with pytest.raises(openai.BadRequestError) as err:  # 4 prompts x n=5 = 20 completions > 16
        client.completions.create(model="sql", prompt=["a", "b", "c", "d"], n=5, max_tokens=2)
    assert err.value.body["param"] == "prompt" and "20 completions" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sql", prompt=[[1, 70]] * 17, max_tokens=2)
    ok = client.completions.create(model="sql", prompt=["a", "b", "c", "d"], n=4, max_tokens=2, temperature=0)
    assert len(ok.choices) == 16


def test_a_non_streaming_client_that_disconnects_cancels_its_rows(server, client, reference):
    engine = server.engine
    cancelled = engine.stats().get("cancelled_rows", 0)
    body = {"model": "poem", "prompt": PROMPTS[0], "n": 4, "max_tokens": 900, "temperature": 1.0}
    outcome: list[object] = []

    def give_up() -> None:
        try:
            outcome.append(_post(server, "/v1/completions", body, timeout=1.0))
        except httpx.ReadTimeout as exc:
            outcome.append(exc)

    with engine.paused():
        gone = threading.Thread(target=give_up)
        gone.start()
        deadline = time.monotonic() + 30
        while engine.pending() < 4:
            assert time.monotonic() < deadline, "the request did not reach the engine"
            time.sleep(0.01)
        gone.join(30)
        assert isinstance(outcome[0], httpx.ReadTimeout)  # the client gave up and closed its connection
        time.sleep(0.5)  # (the server checks every 0.1 s)
    deadline = time.monotonic() + 30
    while engine.stats().get("cancelled_rows", 0) < cancelled + 4:  # dropped, not decoded for 900 tokens
        assert time.monotonic() < deadline, "the disconnected client's rows were not cancelled"
        time.sleep(0.05)
    assert _complete(client, "sql", PROMPTS[0]).choices[0].text == reference[("sql", PROMPTS[0])]


def test_an_adapter_with_non_finite_weights_is_refused_at_load(server, tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from tunekit.serve.embedded.pool import AdapterPool

    bad = make_adapter(tiny_model, tmp_path / "nan", seed=3)
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"lora_B holds NaN or infinite values") as err:
        server.engine.add_adapter("nan", bad)
    assert "nan" not in server.engine.adapters() and "diverged" in err.value.hint
    # finite on disk but B x alpha/r overflows fp16: refused too, in that dtype only
    big = make_adapter(tiny_model, tmp_path / "big", seed=4, b_std=1e5)
    model = server.engine.model
    AdapterPool(model, max_loras=1, device=torch.device("cpu"), dtype=torch.float32).register("big", big)
    with pytest.raises(ConfigError, match="overflow torch.float16"):
        AdapterPool(model, max_loras=1, device=torch.device("cpu"), dtype=torch.float16).register("big", big)


def test_the_bearer_token_never_shows_in_logs_errors_or_events(tiny_model, tmp_path, caplog, capsys, monkeypatch):
    """Canary: a key that appears anywhere the server or the launcher writes fails the test."""
    import logging

    from tests.test_serve_vllm import _fake_vllm
    from tunekit import ServerError
    from tunekit.cli.main import main
    from tunekit.serve.embedded import start_in_thread
    from tunekit.serve.vllm import launch, plan_vllm

    canary = "canary-Zq81sk3K7wP"
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)
    with start_in_thread(str(tiny_model), {}, api_key=canary, batch_window_ms=0) as srv:
        base, good = str(tiny_model), {"Authorization": f"Bearer {canary}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": canary}, good):
            seen.append(httpx.get(srv.url + "/v1/models", headers=headers).text)
        for body in ({"model": base, "prompt": "x", "temperature": 1e-40}, {"model": "nope", "prompt": "x"},
                     {"model": base, "prompt": "x", "max_tokens": 3, "stream": True}):
            seen.append(httpx.post(srv.url + "/v1/completions", json=body, headers=good).text)  # SSE events too
        seen.append(httpx.post(srv.url + "/v1/completions", content=b"{", headers=good).text)
        monkeypatch.setattr(srv.engine, "stats", lambda: 1 / 0)  # a 500 and its logged traceback
        seen.append(httpx.get(srv.url + "/tunekit/stats", headers=good).text)
        seen.append(repr(srv))
    talkative = "import os, sys\nprint('config: api_key=' + os.environ['VLLM_API_KEY'])\nsys.exit(1)\n"
    plan = plan_vllm("base-model", {}, api_key=canary, port=8123, executable=str(_fake_vllm(tmp_path, talkative)))
    seen += [repr(plan), str(plan.to_dict()), plan.command_line()]
    with pytest.raises(ServerError) as err:  # vLLM's log tail goes into the error: the key is masked there
        launch(plan, timeout=30, poll_interval=0.1, log_path=tmp_path / "vllm.log")
    assert canary in (tmp_path / "vllm.log").read_text()  # (the canary really was in what the error quotes)
    seen += [str(err.value), str(err.value.hint)]
    for extra in ([], ["--json"]):
        assert main(["serve", "base-model", "--engine", "vllm", "--api-key", canary, "--dry-run", *extra]) == 0
    seen.append(capsys.readouterr().out)
    # the calls did run: refused, listed, streamed
    assert "invalid_api_key" in seen[0] + seen[1] and '"data"' in seen[3] and "data: [DONE]" in seen[6]
    leaks = [s for s in seen + [caplog.text] if canary in s]
    assert not leaks, leaks


# -- DoRA served unmerged --------------------------------------------------------------------------------------

def _dora_adapter(tiny_model, out: Path, seed: int) -> Path:
    """A DoRA adapter on every linear layer, with magnitudes moved off their initial value (||W||)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = make_adapter(tiny_model, out, use_dora=True, target_modules="all-linear", seed=seed)
    state = load_file(str(path / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in state if "lora_magnitude_vector" in k]:
        state[key] = state[key] * (1 + 0.3 * torch.randn(state[key].shape, generator=gen))
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def test_dora_rows_in_a_mixed_batch_equal_peft_dora_forward(tiny_model, adapters, tmp_path):
    """fp32 on CPU: the served forward (LoRA + per-channel gain) against PEFT's DoRA layer, row by row."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunekit.serve.embedded.pool import AdapterPool

    dora = _dora_adapter(tiny_model, tmp_path / "dora", seed=11)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    pool = AdapterPool(model, max_loras=3, device=torch.device("cpu"), dtype=torch.float32)
    for name, path in (("dora", dora), ("sql", adapters["sql"])):
        pool.register(name, path)
    rows = ["dora", "sql", None, "dora"]
    ids = torch.randint(10, 200, (len(rows), 7), generator=torch.Generator().manual_seed(2))
    pool.slots.set_rows(pool.acquire(rows))
    with torch.inference_mode():
        served = model(input_ids=ids).logits
    refs = {}
    for name, path in (("dora", dora), ("sql", adapters["sql"]), (None, None)):
        ref = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        ref = PeftModel.from_pretrained(ref, path) if path else ref
        with torch.inference_mode():
            refs[name] = ref(input_ids=ids).logits
    for i, name in enumerate(rows):
        # fp32 (eps 1.2e-7) through a few layers of width <= 256: errors stay near 1e-6 of logits of size ~1
        torch.testing.assert_close(served[i], refs[name][i], rtol=1e-4, atol=1e-5)
    assert (refs["dora"] - refs["sql"]).abs().max() > 1e-2  # DoRA really differs from the LoRA row
    pool.slots._dora_slots.clear()  # the same rows without the DoRA gains: the LoRA part alone is far off
    pool.slots.set_rows(pool.acquire(rows))
    with torch.inference_mode():
        assert (model(input_ids=ids).logits[0] - refs["dora"][0]).abs().max() > 1e-2


def test_dora_adapter_served_next_to_lora_through_the_http_server(client, server, tiny_model, tmp_path, reference):
    engine = server.engine
    dora = _dora_adapter(tiny_model, tmp_path / "dora-http", seed=12)
    engine.add_adapter("dora", dora)
    try:
        expected = peft_greedy(tiny_model, dora, PROMPTS[0], 8)
        results: dict[str, object] = {}
        with engine.paused():  # DoRA, LoRA and base rows in one batch
            ts = [threading.Thread(target=lambda m=m: results.__setitem__(m, _complete(client, m, PROMPTS[0])))
                  for m in ("dora", "sql", str(tiny_model))]
            for t in ts:
                t.start()
            while engine.pending() < 3:
                time.sleep(0.01)
        for t in ts:
            t.join(60)
        assert results["dora"].choices[0].text == expected
        assert results["sql"].choices[0].text == reference[("sql", PROMPTS[0])]
        assert results[str(tiny_model)].choices[0].text == reference[(None, PROMPTS[0])]
        batch = engine.stats()["recent_batches"][-1]
        assert batch["models"] == ["__base__", "dora", "sql"]
        assert _complete(client, "dora", PROMPTS[1]).choices[0].text == peft_greedy(tiny_model, dora, PROMPTS[1], 8)
    finally:
        engine.remove_adapter("dora")


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_requests_arriving_mid_batch_join_at_the_next_step(tiny_model, adapters, decode):
    """Continuous batching: a request submitted while a long batch decodes is served before that batch ends,
    with the output it gets alone (greedy); joiners longer and shorter than the running rows, other adapters.
    The static cache (the CUDA-graph path, without capture) gives the eager path's tokens: the long row
    outgrows its first cache length (512 columns), the joiners take free rows of a larger bucket."""
    from tunekit.serve.embedded.engine import Engine
    from tunekit.serve.embedded.requests import GenRequest, SamplingParams

    engine = Engine(str(tiny_model), {k: str(v) for k, v in adapters.items()}, max_loras=2, batch_window_ms=0,
                    decode=decode)
    eager = Engine(str(tiny_model), {k: str(v) for k, v in adapters.items()}, max_loras=2, batch_window_ms=0,
                   decode="eager")
    try:
        assert engine.stats()["decode"] == decode
        engine.eos_ids = eager.eos_ids = set()  # every request runs to max_tokens: the long one really is long
        jobs = {"long": ("sql", "Hi", 160 if decode == "eager" else 600),
                "longer_prompt": (None, "The quick brown fox jumps over the lazy dog " * 3, 6),
                "short_prompt": ("poem", "Yo", 6)}
        alone = {k: eager.generate(p, a, max_tokens=n, temperature=0).text for k, (a, p, n) in jobs.items()}
        events: list[tuple[str, str]] = []
        texts = {k: [] for k in jobs}
        reqs = {}

        def submit(key: str) -> GenRequest:
            adapter, prompt, n = jobs[key]

            def sink(_i, kind, payload, key=key):
                events.append((key, kind))
                if kind == "delta":
                    texts[key].append(payload)

            reqs[key] = engine.submit(GenRequest(engine.encode(prompt), adapter,
                                                 SamplingParams(max_tokens=n, temperature=0), sink))
            return reqs[key]

        def wait_tokens(key: str, n: int) -> None:
            deadline = time.monotonic() + 60
            while len(reqs[key].generated) < n:
                assert time.monotonic() < deadline and (key, "done") not in events
                time.sleep(0.002)

        submit("long")
        wait_tokens("long", 3)
        submit("longer_prompt")  # its prompt is wider than the running rows: they get padded
        wait_tokens("longer_prompt", 2)
        submit("short_prompt")  # narrower than the running rows: it gets padded
        deadline = time.monotonic() + 120
        while sum(kind in ("done", "error") for _, kind in events) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not [e for e in events if e[1] == "error"], events
        order = [k for k, kind in events if kind == "done"]
        assert order[-1] == "long", order  # both joiners finished while the long row was still decoding
        first_delta = {k: events.index((k, "delta")) for k in jobs}
        assert all(first_delta[k] < events.index(("long", "done")) for k in ("longer_prompt", "short_prompt"))
        assert {k: "".join(v) for k, v in texts.items()} == alone  # as served alone, the long row too
        stats = engine.stats()
        assert stats["joined_rows"] == 2 and stats.get("failed_batches", 0) == 0  # no step failed, not even unseen
        assert [b["joined"] for b in stats["recent_batches"][-3:]] == [0, 1, 2]
    finally:
        engine.close()
        eager.close()


def test_static_decode_serves_a_mixed_batch_like_eager_and_falls_back_cleanly(tiny_model, adapters, reference):
    """One batch of base, LoRA and DoRA-free mixed rows through the static cache equals PEFT alone (greedy);
    rows leaving mid-batch free their cache rows. CUDA graphs asked for on a CPU fall back to the static
    cache, and /stats says so."""
    from tunekit.serve.embedded.engine import Engine

    engine = Engine(str(tiny_model), {k: str(v) for k, v in adapters.items()}, max_loras=2, batch_window_ms=0,
                    decode="graphs" if not __import__("torch").cuda.is_available() else "static")
    try:
        stats = engine.stats()
        assert stats["decode"] == "static"
        if stats.get("decode_fallback"):
            assert "CUDA" in stats["decode_fallback"]
        out: dict = {}
        jobs = [(a, p, n) for a in (None, "sql", "poem") for p in PROMPTS for n in (3, 8)]

        def call(i: int, adapter, prompt, n) -> None:
            out[i] = engine.generate(prompt, adapter, max_tokens=n, temperature=0).text

        with engine.paused():
            threads = [threading.Thread(target=call, args=(i, *job)) for i, job in enumerate(jobs)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while engine.pending() < len(jobs):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        for t in threads:
            t.join(timeout=120)
        for i, (a, p, n) in enumerate(jobs):
            if n == 8:
                assert out[i] == reference[(a, p)], (a, p)
            else:
                assert reference[(a, p)].startswith(out[i]), (a, p)
        assert engine.stats()["recent_batches"][-1]["size"] == len(jobs)  # one batch: 12 rows in a 16-row bucket
    finally:
        engine.close()


def test_unloading_an_adapter_mid_decode_fails_its_rows_only(tiny_model, adapters):
    """A request joining after an adapter was unloaded must not get that adapter's slot under running rows,
    nor fail them all: the unloaded adapter's rows get an error, the others and the joiner go on."""
    from tunekit.serve.embedded.engine import Engine
    from tunekit.serve.embedded.requests import GenRequest, SamplingParams

    engine = Engine(str(tiny_model), {k: str(v) for k, v in adapters.items()}, max_loras=2, batch_window_ms=0)
    try:
        engine.eos_ids = set()
        alone = {a: engine.generate("Hi", a, max_tokens=n, temperature=0).text for a, n in (("poem", 40), (None, 4))}
        results: dict[str, list] = {}

        def submit(key, adapter, n, **params):
            results[key] = []
            req = GenRequest(engine.encode("Hi"), adapter, SamplingParams(max_tokens=n, temperature=0, **params),
                             lambda _i, kind, payload, key=key: results[key].append((kind, payload)))
            return engine.submit(req)

        sql = submit("sql", "sql", 200)
        submit("poem", "poem", 40)
        deadline = time.monotonic() + 60
        while len(sql.generated) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        engine.remove_adapter("sql")
        submit("bad_seed", None, 4, seed=2**70)  # fails alone at its join, after the sql row has left
        while not results["bad_seed"]:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert results["bad_seed"][-1][0] == "error" and "seed" in results["bad_seed"][-1][1]
        submit("base", None, 4)
        while not all(res and res[-1][0] in ("done", "error") for res in results.values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert results["sql"][-1][0] == "error" and "unloaded" in results["sql"][-1][1]
        for key, adapter in (("poem", "poem"), ("base", None)):
            assert results[key][-1][0] == "done"
            assert "".join(p for kind, p in results[key] if kind == "delta") == alone[adapter]
        assert engine.stats().get("failed_batches", 0) == 0
    finally:
        engine.close()


@pytest.mark.parametrize("dora", [False, True])
def test_indexed_rows_gather_once_into_fixed_buffers(tiny_model, monkeypatch, dora):
    """For CUDA graphs the rows' A/B are gathered when the rows are set, into buffers kept per batch size: a
    captured step then reads them (no gather inside it), and a new composition or a rewritten slot of the same
    size lands in the same memory. Checked on CPU: the forward equals the ordinary mixed path, gathers nothing,
    and the buffers keep their addresses."""
    import torch

    model, slots = _random_slots(tiny_model, dora=dora)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(10, 200, (4, 5), generator=gen)

    def logits(rows, indexed):
        slots.set_rows(rows, indexed=indexed)
        with torch.inference_mode():
            return model(input_ids=ids).logits

    q = model.model.layers[0].self_attn.q_proj
    eps = rounding_eps("float32", model.config.intermediate_size)
    for rows in ([1, 2, 0, 3], [3, 3, 1, 0]):
        want = logits(rows, False)
        slots.set_rows(rows, indexed=True)
        ptrs = (q._group.At.data_ptr(), q._group.BT[0].data_ptr())
        assert (q._group.G[0] is not None) == dora
        calls = []
        real = torch.Tensor.index_select
        monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        with torch.inference_mode():
            got = model(input_ids=ids).logits
        monkeypatch.setattr(torch.Tensor, "index_select", real)
        assert calls == []  # nothing gathered in the step itself
        assert_close(got, want, eps)
        if rows[0] == 1:
            first = ptrs
        else:
            assert ptrs == first  # the same buffers for the same batch size
    # a slot rewritten while its rows stay: set_rows again and the step reads the new weights
    slots.write(3, torch.zeros_like(slots.storage[3]))
    want = logits([3, 3, 1, 0], False)
    assert_close(logits([3, 3, 1, 0], True), want, eps)
    assert (q._group.At.data_ptr(), q._group.BT[0].data_ptr()) == first
    assert torch.equal(q._group.At[0], torch.zeros_like(q._group.At[0]))  # row 0 uses slot 3: now zero


@pytest.mark.parametrize("dora,bias", [(False, False), (True, False), (False, True), (True, True)])
def test_decode_lora_kernels_equal_the_bmm_path(tiny_model, monkeypatch, dora, bias):
    """lora_triton's shrink/expand (run here by Triton's CPU interpreter; on CUDA by tests/gpu/test_serve_graphs.py)
    give a mixed decode step the logits of the gathers + bmm path, read each row's adapter from the storage itself
    (indexed rows gather nothing), and keep one slot-index buffer per batch size for captured steps. Rank 6 is not a
    power of two, so the kernels' masks are exercised. Biased projections run their base GEMM with the bias; DoRA on
    them keeps the bmm path (its gain scales the output without the bias), with the same logits."""
    pytest.importorskip("triton")
    import os

    import torch

    from tunekit.serve.embedded import lora_triton

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CUDA machine: tests/gpu/test_serve_graphs.py runs the compiled kernels")
    try:
        model, slots = _random_slots(tiny_model, rank=6, dora=dora, bias=bias)
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(10, 200, (5, 6), generator=gen)
        nxt = torch.randint(10, 200, (5, 1), generator=gen)
        rows = [1, 2, 0, 3, 1]

        def step(kernels, indexed=False):  # prefill (bmm path: several tokens per row) + one decode step
            slots.kernels = kernels
            slots.set_rows(rows)
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=True)
                slots.set_rows(rows, indexed=indexed)
                return model(input_ids=nxt, cache=out.past_key_values).logits

        want = step(False)
        before = slots.shared_shrinks
        got = step(True)
        layers = model.config.num_hidden_layers
        assert slots.shared_shrinks - before == 3 * layers * 2  # prefill's bmm and the kernel shrink both shared
        # fp32 both ways; the kernels sum in another order (split-K partials)
        assert_close(got, want, rounding_eps("float32", model.config.intermediate_size))
        q, gate = model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.gate_proj
        got_indexed = step(True, indexed=True)
        assert gate._group.At is None  # nothing gathered for the captured step: the kernels read the storage
        assert (q._group.At is None) == (not (dora and bias))  # DoRA on biased q/k/v: the bmm path's gathers
        assert_close(got_indexed, want, rounding_eps("float32", model.config.intermediate_size))
        buf = slots._state.rows
        rows[0] = 3
        slots.set_rows(rows, indexed=True)
        assert slots._state.rows is buf and buf.tolist() == rows  # the same buffer, refreshed in place
        slots.kernels = False
        assert rel_diff(step(True), want) > 1e-3  # the kernels' delta matters: a changed row changes logits
    finally:
        slots.kernels = False


@pytest.mark.parametrize("dora", [False, True])
def test_decode_lora_kernels_fused_into_norms_and_mlp(tiny_model, monkeypatch, dora):
    """lora_fusion: the RMSNorm before q/k/v and before gate/up computes its group's shrink in the same launch, and
    gate/up's expand + SiLU(gate) * up + down's shrink are one launch: 4 LoRA launches per layer instead of 8, with
    the logits of the unfused kernels and of the bmm path. A norm that does not compute as Llama's (here one given
    Gemma's offset) is left alone and its group shrinks for itself."""
    pytest.importorskip("triton")
    import os

    import torch

    from tunekit.serve.embedded import lora_triton

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CUDA machine: tests/gpu/test_serve_graphs.py runs the compiled kernels")
    model, slots = _random_slots(tiny_model, rank=6, dora=dora)
    layers = model.config.num_hidden_layers
    calls: dict[str, int] = {}
    for fn in ("shrink", "expand", "norm_shrink", "expand_swiglu"):
        real = getattr(lora_triton, fn)
        monkeypatch.setattr(lora_triton, fn, lambda *a, _f=fn, _r=real, **kw: calls.update({_f: calls.get(_f, 0) + 1})
                            or _r(*a, **kw))
    gen = torch.Generator().manual_seed(7)
    ids, nxt = torch.randint(10, 200, (4, 6), generator=gen), torch.randint(10, 200, (4, 1), generator=gen)
    rows = [1, 2, 0, 3]

    def step(kernels, fuse=True):
        slots.kernels = kernels
        monkeypatch.setitem(lora_triton.TUNING, "fuse", fuse)
        slots.set_rows(rows)
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            calls.clear()
            return model(input_ids=nxt, cache=out.past_key_values).logits

    try:
        want = step(False)
        eps = rounding_eps("float32", model.config.intermediate_size)
        unfused = step(True, fuse=False)
        assert calls == {"shrink": 4 * layers, "expand": 4 * layers}
        fused = step(True)
        assert slots.fused == {"norm_shrink": 2 * layers, "swiglu": layers}
        assert calls == {"norm_shrink": 2 * layers, "shrink": layers, "expand_swiglu": layers, "expand": 3 * layers}
        assert_close(fused, want, eps)
        assert_close(fused, unfused, eps)
        model.model.layers[0].input_layernorm.offset = 1.0  # Gemma's (1 + w): not Llama's norm
        slots.kernels = True  # re-fuse, as a new layout does
        assert slots.fused == {"norm_shrink": 2 * layers - 1, "swiglu": layers}
        assert_close(step(True), want, eps)  # (transformers' forward ignores the attribute: the logits stay)
        assert (calls["norm_shrink"], calls["shrink"]) == (2 * layers - 1, layers + 1)  # q/k/v shrink themselves
        del model.model.layers[0].input_layernorm.offset
        slots.kernels = True
        assert_close(step(True), want, eps)
        assert calls["norm_shrink"] == 2 * layers
        slots.write(2, torch.zeros_like(slots.storage[2]))  # a row's adapter changes: the fused step follows
        assert rel_diff(step(True), fused) > 1e-3
        assert_close(step(True), step(False), eps)
    finally:
        slots.kernels = False


def test_fused_kernels_option_is_checked_and_reported(tiny_model):
    """`kernels`: Liger's kernels where they can run (CUDA), refused when asked for where they cannot, and what
    runs (or why not) shown in the stats, so the setting is never silently ignored."""
    import torch

    from tunekit._exceptions import ConfigError
    from tunekit.serve.embedded.engine import Engine
    from tunekit.serve.embedded.fused import apply_fused_kernels

    def fake(model_type: str):
        config = type("C", (), {"to_dict": lambda self: {"model_type": model_type}})()
        return type("M", (), {"config": config})()

    model = fake("llama")
    with pytest.raises(ConfigError, match="not one of auto, liger, off"):
        apply_fused_kernels(model, torch.device("cpu"), "fast")
    with pytest.raises(ConfigError, match="kernels='liger' cannot run here: CUDA only") as err:
        apply_fused_kernels(model, torch.device("cpu"), "liger")
    assert err.value.field == "kernels" and "kernels='auto'" in err.value.hint
    assert apply_fused_kernels(model, torch.device("cpu"), "off") == ("off", None)
    assert apply_fused_kernels(fake("gpt2"), torch.device("cuda"), "auto") == ("off", "model type 'gpt2' not covered")
    engine = Engine(str(tiny_model), device="cpu", decode="eager")
    try:
        stats = engine.stats()
        assert (stats["kernels"], stats["kernels_note"]) == ("off", "CUDA only (Triton kernels)")
        assert stats["lora_decode"] == "bmm"  # lora_triton's kernels are CUDA only too
    finally:
        engine.close()


def test_gqa_decode_attention_equals_sdpa_without_repeating_kv(monkeypatch):
    """One query per row: the query heads of a KV head become its rows, so K/V are never repeated per head;
    the result is transformers' sdpa attention's (fp32 rounding of one softmax-weighted sum)."""
    import torch
    from transformers.integrations import sdpa_attention

    from tunekit.serve.embedded.attention import _gqa_decode

    gen = torch.Generator().manual_seed(0)
    rows, heads, kv, length, dim = 3, 8, 2, 11, 16
    q = torch.randn(rows, heads, 1, dim, generator=gen)
    k, v = (torch.randn(rows, kv, length, dim, generator=gen) for _ in range(2))
    mask = torch.zeros(rows, 1, 1, length)
    mask[0, ..., :4] = torch.finfo(torch.float32).min  # left padding
    mask[2, ..., 7:] = float("-inf")  # free columns
    module = type("Attn", (), {"num_key_value_groups": heads // kv, "is_causal": True, "training": False})()
    want, _ = sdpa_attention.sdpa_attention_forward(module, q, k, v, mask, scaling=dim ** -0.5)
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: pytest.fail("K/V repeated for a decode step"))
    got, _ = _gqa_decode(module, q, k, v, mask, scaling=dim ** -0.5)
    assert got.shape == want.shape == (rows, 1, heads, dim)
    assert_close(got, want, rounding_eps("float32", length * dim))


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_engine_decode_steps_repeat_no_kv(tiny_model, monkeypatch, decode):
    """Decode steps never repeat K/V per query head. Where transformers' sdpa path would (no `pack_gqa`, as in
    5.17: simulated here by removing it), the engine attends through its grouped decode, with the same greedy
    tokens as transformers' own grouping. The prefill of one unpadded row has no mask (SDPA's grouped-query flag)."""
    from transformers.integrations import sdpa_attention

    from tunekit.serve.embedded.attention import NAME
    from tunekit.serve.embedded.engine import Engine

    calls = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: calls.append(1) or real(*a))
    texts = {}
    for upstream in (True, False):
        if not upstream:
            monkeypatch.delattr(sdpa_attention, "pack_gqa", raising=False)
        engine = Engine(str(tiny_model), device="cpu", decode=decode, batch_window_ms=0)
        try:
            engine.eos_ids = set()
            assert engine.stats()["attention"] == ("sdpa" if hasattr(sdpa_attention, "pack_gqa") else NAME)
            texts[upstream] = engine.generate("Hello there", None, max_tokens=12, temperature=0).text
            assert calls == []
        finally:
            engine.close()
    assert texts[False] == texts[True]


def test_incremental_detokenization_is_the_whole_decode_and_linear(tiny_model):
    """A row's text grows by a short window per step: at every step it is a prefix of the whole output's decode
    (bytes of an unfinished character held back), at the end it equals it, and the tokens decoded over a row
    grow linearly with its length (the whole output at every step: quadratically)."""
    import random

    from transformers import AutoTokenizer

    from tunekit.serve.embedded.detok import grow_text
    from tunekit.serve.embedded.requests import GenRequest, SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model)
    decoded = []
    real = tok.decode

    def counting(ids, **kw):
        decoded.append(len(ids))
        return real(ids, **kw)

    tok.decode = counting
    rng = random.Random(0)
    text_ids = tok("naïve café – 日本語 🙂 plain words, then more: ünïcödé 🙂🙂", add_special_tokens=False)["input_ids"]
    specials = set(tok.all_special_ids)
    for trial in range(20):  # real text (multi-byte characters split over byte tokens) and random ids
        ids = text_ids * 3 if trial == 0 else [rng.randrange(tok.vocab_size) for _ in range(300)]
        r = GenRequest([1], None, SamplingParams(), lambda *a: None)
        decoded.clear()
        for i in ids:
            r.generated.append(i)
            text = grow_text(tok, r)
            assert real(r.generated, skip_special_tokens=True).startswith(text)
        whole = real(ids, skip_special_tokens=True)
        assert text == whole or (whole.startswith(text) and set(whole[len(text):]) == {"\ufffd"})
        assert sum(decoded) < 12 * len(ids), (trial, sum(decoded))  # whole-output decodes: ~len^2 / 2
        if trial == 0:
            assert text == whole and "日本語 🙂" in text and not specials & set(ids)


def test_engine_detokenizes_each_row_in_linear_time(tiny_model):
    from tunekit.serve.embedded.engine import Engine

    engine = Engine(str(tiny_model), device="cpu", decode="eager", batch_window_ms=0)
    try:
        engine.eos_ids = set()
        decoded = []
        real = engine.tokenizer.decode
        engine.tokenizer.decode = lambda ids, **kw: decoded.append(len(ids)) or real(ids, **kw)
        out = engine.generate("Hello there", None, max_tokens=300, temperature=0)
        assert out.completion_tokens == 300
        assert sum(decoded) < 13 * 300, sum(decoded)  # decoding the whole output every step: ~45,000 tokens
    finally:
        engine.close()


def test_incremental_detokenization_redecodes_when_context_changes_earlier_text():
    """A decoder whose later tokens rewrite earlier text ("a" then "b" reads "X"): the window's text is no longer
    an extension of the text so far, so the whole output is decoded once and the text is the whole decode."""
    from tunekit.serve.embedded.detok import grow_text
    from tunekit.serve.embedded.requests import GenRequest, SamplingParams

    class Merging:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("abcd"[i] for i in ids).replace("ab", "X")

    tok = Merging()
    r = GenRequest([1], None, SamplingParams(), lambda *a: None)
    seen = []
    for i in (0, 1, 2, 3):  # a, b, c, d
        r.generated.append(i)
        seen.append(grow_text(tok, r))
    assert seen == ["a", "a", "Xc", "Xcd"]  # "b" held (the window shrank), then the whole decode "Xc"
    assert (r.prefix_offset, r.read_offset) == (3, 4)
