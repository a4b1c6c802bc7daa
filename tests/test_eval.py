"""tunekit eval: a deliberately better adapter beats a random one and the base, on every metric; the judge,
the report files, --json, the registry and resume, on a tiny Llama served in-process."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("fastapi")
pytest.importorskip("openai")

from tests.conftest_serve import make_adapter  # noqa: E402

HELD_OUT = [{"prompt": "Q: capital of France?\nA:", "response": " Paris"},
            {"prompt": "Q: 2+2?\nA:", "response": " 4"},
            {"prompt": "Q: colour of grass?\nA:", "response": " green"},
            {"prompt": "Q: opposite of hot?\nA:", "response": " cold"}]


def train_on(base: Path, data: Path, out: Path, steps: int = 60, lr: float = 1e-2) -> Path:
    """A LoRA adapter trained on exactly the held-out answers (completion tokens, as the local backend masks)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunekit.eval.loss import masked_examples

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    examples = masked_examples(data, tok, 1024)
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), tok.pad_token_id)
    labels = torch.full((len(examples), width), -100)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    for k, (row, mask) in enumerate(examples):
        ids[k, :len(row)] = torch.tensor(row)
        att[k, :len(row)] = 1
        labels[k, :len(row)] = torch.where(torch.tensor(mask) == 1, torch.tensor(row), -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


class FakeOpenAI:
    """A chat-completions endpoint on 127.0.0.1: ``reply(body)`` gives (HTTP status, content). Counts calls."""

    def __init__(self, reply) -> None:
        self.calls: list[dict] = []
        self.auth: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append(body)
                fake.auth.append(self.headers.get("Authorization"))
                status, content = reply(body)
                out = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]}
                                 if status == 200 else {"error": {"message": content}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()


def FakeJudge(mode: str) -> FakeOpenAI:
    """'reference' prefers the answer equal to the reference; 'always_a' always says A (pure position bias)."""
    def verdict(body):
        text = body["messages"][-1]["content"]
        ref, a, b = (re.search(rf"## {h}\n(.*?)\n\n##", text, re.S).group(1)
                     for h in ("Reference answer", "Answer A", "Answer B"))
        return 200, "A" if mode == "always_a" or a == ref else "B" if b == ref else "TIE"

    return FakeOpenAI(verdict)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """The base, a trained ('good') and a random ('bad') adapter, both registered, evaluated once with
    every metric and the judge, in a TUNEKIT_HOME of this module."""
    import tunekit
    from tunekit.store import default_store

    root = tmp_path_factory.mktemp("eval")
    data = root / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    good = train_on(tiny_model, data, root / "good")
    bad = make_adapter(tiny_model, root / "bad", r=8, seed=3)
    judge = FakeJudge("reference")
    notices: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(root / "home"))
        store = default_store()
        for name, path in (("good", good), ("bad", bad)):
            store.add_adapter(backend="local", location=str(path), info={}, name=name, base_model=str(tiny_model))
        result = tunekit.evaluate([str(tiny_model), "good", "bad"], data,
                                  metrics=["loss", "exact_match", "contains", "regex", "json_valid"], max_tokens=8,
                                  judge="fake-judge", judge_base_url=judge.url, on_notice=notices.append)
    judge.close()
    return {"result": result, "data": data, "home": root / "home", "base": tiny_model, "good": good, "bad": bad,
            "judge_calls": len(judge.calls), "notices": notices, "root": root}


def _by_name(result):
    return {t.target: t for t in result.targets}


def test_trained_adapter_wins_on_loss_and_every_text_metric(setup):
    res = _by_name(setup["result"])
    base, good, bad = res[str(setup["base"])], res["good"], res["bad"]
    assert good.metrics["loss"] < min(base.metrics["loss"], bad.metrics["loss"])
    assert good.ci["loss"][1] < min(base.ci["loss"][0], bad.ci["loss"][0])  # not just a better point estimate
    for m in ("exact_match", "contains", "regex"):
        assert good.metrics[m] == 1.0 and base.metrics[m] == 0.0 and bad.metrics[m] == 0.0, m
    lo, hi = good.ci["exact_match"]
    assert 0 < lo < 1 and hi == 1.0  # Wilson interval of 4/4
    assert good.metrics["perplexity"] == pytest.approx(2.718281828 ** good.metrics["loss"])


def test_answers_come_from_the_adapters_through_the_embedded_engine(setup):
    rows = setup["result"].rows
    assert [r["answers"]["good"] for r in rows] == [r["response"] for r in HELD_OUT]
    assert rows[0]["line"] == 1 and rows[0]["reference"] == " Paris"


def test_judge_prefers_the_trained_adapter_and_was_asked_both_orders(setup):
    res = _by_name(setup["result"])
    assert res["good"].judge == {"baseline": str(setup["base"]), "wins": 4, "ties": 0, "losses": 0,
                                 "unreadable_verdicts": 0, "calls": 8}
    assert res["bad"].judge["ties"] == 4  # neither answer is the reference
    assert res["good"].metrics["judge_win_rate"] == 1.0
    assert "judge_win_rate" not in res[str(setup["base"])].metrics
    assert setup["judge_calls"] == 2 * 2 * len(HELD_OUT)  # 2 pairs x rows x 2 orders
    assert any("16 judge call(s) to fake-judge" in n for n in setup["notices"])


def test_position_swap_cancels_a_judge_that_always_prefers_a(setup, monkeypatch):
    import tunekit

    monkeypatch.setenv("TUNEKIT_HOME", str(setup["home"]))  # answers cached by the first run: no model loads
    judge = FakeJudge("always_a")
    try:
        result = tunekit.evaluate([str(setup["base"]), "good"], setup["data"], metrics=["exact_match"],
                                  max_tokens=8, judge="biased", judge_base_url=judge.url, record=False)
    finally:
        judge.close()
    assert _by_name(result)["good"].judge["ties"] == 4 and len(judge.calls) == 8


def test_json_shape(setup):
    out = setup["result"].to_json()
    assert set(out) >= {"data", "targets", "settings", "judge"}
    assert out["data"]["rows"] == 4 and out["data"]["kind"] == "prompt_response" and len(out["data"]["sha256"]) == 64
    assert [t["target"] for t in out["targets"]] == [str(setup["base"]), "good", "bad"]
    assert set(out["targets"][1]["metrics"]) == {"loss", "perplexity", "exact_match", "contains", "regex",
                                                 "json_valid", "judge_win_rate"}
    assert out["settings"]["temperature"] == 0.0
    json.dumps(out)  # serialisable as is


def test_report_files_hold_the_tables(setup, tmp_path):
    from html.parser import HTMLParser

    result = setup["result"]
    md = result.write(tmp_path / "report.md").read_text()
    assert "| target | loss | perplexity | exact_match | contains | json_valid | judge_win_rate | regex |" in md
    assert "| good | " in md and "1.00 [0.51, 1.00]" in md and "(4W/0T/0L)" in md
    assert "## Rows where the targets disagree most" in md and "**reference:**  Paris" in md
    page = result.write(tmp_path / "report.html").read_text()

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cells, self.tags = [], set()

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)

        def handle_data(self, data):
            self.cells.append(data)

    parser = Cells()
    parser.feed(page)
    assert {"table", "style"} <= parser.tags and not parser.tags & {"script", "link", "img"}  # self-contained
    assert "good" in parser.cells and "1.00 [0.51, 1.00]" in parser.cells
    assert " Paris" in parser.cells  # the side-by-side rows


def test_results_recorded_in_the_registry_and_shown_by_the_cli(setup, monkeypatch, capsys):
    from tunekit.cli.main import main
    from tunekit.store import default_store

    monkeypatch.setenv("TUNEKIT_HOME", str(setup["home"]))
    evals = default_store().get_adapter("good").info["evals"]
    last = evals[-1]
    assert last["data"]["sha256"] == setup["result"].data["sha256"]
    assert last["metrics"]["exact_match"] == 1.0 and last["judge"]["model"] == "fake-judge"
    assert last["settings"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "seed": None}
    assert main(["adapters", "show", "good"]) == 0
    assert '"exact_match": 1.0' in capsys.readouterr().out
    for metric, first in (("exact_match", "good"), ("loss", "good")):
        assert main(["adapters", "list", "--sort", metric]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert metric.upper() in lines[0] and lines[2].split()[1] == first and lines[3].split()[1] == "bad"
    assert main(["adapters", "compare", "good", "bad"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("exact_match"))
    assert row.split()[1] == "1" and row.split()[4] == "0"


def test_resume_does_not_repeat_finished_rows(setup, monkeypatch):
    """A run killed after two answers of a target continues with the other two only."""
    import openai.resources.completions as completions

    import tunekit
    from tunekit.eval.cache import cache_dir

    monkeypatch.setenv("TUNEKIT_HOME", str(setup["root"] / "resume-home"))
    args = ([str(setup["bad"])], setup["data"])
    kw = {"metrics": ["exact_match"], "max_tokens": 8, "record": False}
    first = tunekit.evaluate(*args, **kw)
    [cache] = cache_dir(first.data["sha256"]).glob("answers-*.jsonl")
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # killed mid-write of the third answer
    calls = []
    real = completions.Completions.create
    monkeypatch.setattr(completions.Completions, "create", lambda self, **k: calls.append(k["prompt"]) or real(self, **k))
    again = tunekit.evaluate(*args, **kw)
    done = {json.loads(line)["key"] for line in lines[:2]}
    assert sorted(calls) == sorted(r["prompt"] for i, r in enumerate(HELD_OUT) if str(i) not in done)
    assert [r["answers"] for r in again.rows] == [r["answers"] for r in first.rows]
    calls.clear()
    tunekit.evaluate(*args, **kw)
    assert calls == []  # everything cached: no request at all


def test_cli_eval_json_and_bad_data(setup, monkeypatch, capsys, tmp_path):
    from tunekit.cli.main import main

    monkeypatch.setenv("TUNEKIT_HOME", str(setup["home"]))
    assert main(["eval", str(setup["base"]), "good", "--data", str(setup["data"]), "--metric", "exact_match",
                 "--max-tokens", "8", "--json", "--no-record", "--out", str(tmp_path / "r.html")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(t["target"], t["metrics"]["exact_match"]) for t in out["targets"]] == [(str(setup["base"]), 0.0),
                                                                                    ("good", 1.0)]
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    assert main(["eval", "good", "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2" in err and str(bad) in err


def test_remote_target_through_the_openai_client_with_the_retry_policy(setup, monkeypatch):
    """URL#MODEL: chat requests to any OpenAI-compatible endpoint; a 503 is retried, the count shown first."""
    import tunekit

    monkeypatch.setattr("tunekit._retry.RetryPolicy.wait_seconds", lambda self, attempt, exc: 0.0)
    failed = []

    def reply(body):
        if not failed:  # the first request fails once
            failed.append(1)
            return 503, "overloaded"
        question = body["messages"][-1]["content"]
        return 200, next(r["response"] for r in HELD_OUT if r["prompt"] == question) if "France" in question else "?"

    endpoint = FakeOpenAI(reply)
    notices: list[str] = []
    try:
        result = tunekit.evaluate([f"{endpoint.url}#ft-model"], setup["data"], metrics=["exact_match", "loss"],
                                  max_tokens=8, concurrency=1, on_notice=notices.append)
    finally:
        endpoint.close()
    [t] = result.targets
    assert t.kind == "remote" and t.metrics == {"exact_match": 0.25}  # no loss for a remote target
    assert len(endpoint.calls) == len(HELD_OUT) + 1  # one retry
    body = endpoint.calls[-1]
    assert body["model"] == "ft-model" and body["temperature"] == 0.0 and body["max_tokens"] == 8
    assert body["messages"][0]["role"] == "user"
    assert notices[0].startswith("loss needs the weights: not computed for remote target(s) http://127.0.0.1:")
    assert notices[1].startswith("4 generation call(s) to 1 remote target(s)")


def test_bad_metric_and_unknown_baseline_are_usage_errors(setup, capsys):
    from tunekit.cli.main import main

    assert main(["eval", "x", "--data", str(setup["data"]), "--metric", "bleu"]) == 2
    assert "unknown metric 'bleu'" in capsys.readouterr().err
    assert main(["eval", "x", "--data", str(setup["data"]), "--metric", "regex:("]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err
    assert main(["eval", "x", "--data", str(setup["data"]), "--judge", "j"]) == 2
    assert "--judge-base-url" in capsys.readouterr().err


def test_managed_registry_adapter_is_asked_at_its_provider_and_gets_the_results(setup, monkeypatch):
    """A Together fine-tune in the registry: chat at TOGETHER_BASE_URL with TOGETHER_API_KEY; results recorded."""
    import tunekit
    from tunekit.store import default_store

    endpoint = FakeOpenAI(lambda body: (200, " 4"))
    monkeypatch.setenv("TOGETHER_API_KEY", "sk-together-test")
    monkeypatch.setenv("TOGETHER_BASE_URL", endpoint.url.removesuffix("/v1"))  # the SDK adds /v1
    store = default_store()
    store.add_adapter(backend="together", location="acct/Meta-Llama-3.1-8B-ft-abc", info={}, name="tog")
    try:
        result = tunekit.evaluate(["tog"], setup["data"], metrics=["exact_match"], max_tokens=8)
    finally:
        endpoint.close()
    assert {c["model"] for c in endpoint.calls} == {"acct/Meta-Llama-3.1-8B-ft-abc"}
    assert set(endpoint.auth) == {"Bearer sk-together-test"}
    assert result.targets[0].metrics["exact_match"] == 0.25
    assert store.get_adapter("tog").info["evals"][-1]["metrics"] == {"exact_match": 0.25}
    monkeypatch.delenv("TOGETHER_API_KEY")
    with pytest.raises(tunekit.ConfigError, match="needs TOGETHER_API_KEY"):
        tunekit.evaluate(["tog"], setup["data"], metrics=["exact_match"])


def test_chat_rows_reference_the_last_assistant_turn_and_score_loss_on_it(setup, tmp_path):
    import tunekit

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]}) + "\n")
    result = tunekit.evaluate([str(setup["base"])], data, metrics=["loss", "exact_match"], max_tokens=4,
                              record=False)
    [row] = result.rows
    assert row["reference"] == "4" and [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert result.targets[0].metrics["exact_match"] == 0.0 and result.targets[0].metrics["loss"] > 0


def test_each_local_base_is_loaded_once_for_loss_and_answers(setup, monkeypatch):
    """The held-out loss is scored on the model the embedded engine generates with: one load of the base
    for the base and its adapter, not one per target plus the engine's."""
    from transformers import AutoModelForCausalLM

    import tunekit

    monkeypatch.setenv("TUNEKIT_HOME", str(setup["root"] / "load-count-home"))  # nothing cached: it generates
    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real(cls, *a, **k)))
    base, good = str(setup["base"]), str(setup["good"])  # an adapter directory: this home has no registry
    result = tunekit.evaluate([base, good], setup["data"], metrics=["loss", "exact_match"], max_tokens=8,
                              record=False)
    assert loads == [base]
    res = _by_name(result)
    assert res[good].metrics["exact_match"] == 1.0 and res[good].metrics["loss"] < res[base].metrics["loss"]


def test_loss_through_the_engine_slots_is_the_peft_loss(setup):
    """The engine's LoRA slots and PEFT compute the same held-out loss (within fp32 rounding)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tolerance import assert_close, rounding_eps
    from tunekit.eval.loss import masked_examples

    base = str(setup["base"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      setup["good"]).eval()
    nll = tokens = 0.0
    with torch.inference_mode():
        for ids, mask in masked_examples(setup["data"], AutoTokenizer.from_pretrained(base), 1024):
            x = torch.tensor([ids])
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None])[:, 0]
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            nll, tokens = nll - float(lp[keep].sum()), tokens + int(keep.sum())
    cfg = model.config
    eps = rounding_eps("float32", max(cfg.intermediate_size, cfg.vocab_size))
    assert_close([_by_name(setup["result"])["good"].metrics["loss"]], [nll / tokens], eps, what="held-out loss")
