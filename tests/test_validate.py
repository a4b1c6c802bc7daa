"""tunekit.data.validate: one test per problem class, each asserting the line and the code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tunekit._exceptions import ConfigError, DataValidationError
import tunekit.data.validator as vmod
from tunekit.data import validate
from tunekit.schemas.report import DataRules, ValidationReport
from tunekit.schemas.rows import RowKind

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def pr(p: str = "2 plus 2?", r: str = "four") -> str:
    return json.dumps({"prompt": p, "response": r})


def chat(*msgs: tuple, **extra) -> str:
    out = []
    for m in msgs:
        d = {"role": m[0], "content": m[1]}
        if len(m) > 2:
            d.update(m[2])
        out.append(d)
    return json.dumps({"messages": out, **extra})


def pref(inp=(("user", "q?"),), good="yes", bad="no", **over) -> str:
    row = {
        "input": {"messages": [{"role": r, "content": c} for r, c in inp]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }
    row.update(over)
    return json.dumps(row)


def write(tmp_path: Path, data: bytes | str | list[str], name: str = "data.jsonl") -> Path:
    if isinstance(data, list):
        data = "".join(line + "\n" for line in data)
    if isinstance(data, str):
        data = data.encode()
    path = tmp_path / name
    path.write_bytes(data)
    return path


def run(tmp_path: Path, data, **kw) -> ValidationReport:
    return validate(write(tmp_path, data), **kw)


def codes(report: ValidationReport) -> list[tuple[int | None, str]]:
    return [(p.line, p.code) for p in report.problems]


# -- clean files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kind,rows",
    [("train.jsonl", RowKind.PROMPT_RESPONSE, 92), ("valid.jsonl", RowKind.PROMPT_RESPONSE, 16),
     ("chat.jsonl", RowKind.CHAT, 40), ("preference.jsonl", RowKind.PREFERENCE, 40)],
)
def test_example_data_is_clean(name, kind, rows):
    r = validate(EXAMPLES / name)
    assert r.valid, r.format_lines()
    assert (r.kind, r.rows, r.lines, r.problem_count) == (kind, rows, rows, 0)


def test_report_fields(tmp_path):
    lines = [pr("ab", "cde"), pr("x", "y"), pr("hello", "world!")]
    path = write(tmp_path, lines)
    r = validate(path)
    assert r.valid and r.kind is RowKind.PROMPT_RESPONSE and r.rows == 3 and r.lines == 3
    assert r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert r.size_bytes == path.stat().st_size
    assert r.length.unit == "characters"
    assert (r.length.count, r.length.min, r.length.max, r.length.p50) == (3, 2, 11, 5)
    assert r.length.mean == pytest.approx((5 + 2 + 11) / 3)
    assert r.backend is None and r.format_lines() == []


def test_exact_percentiles(tmp_path):
    # lengths 2..101 (prompt "p" + response of n-1 chars): nearest-rank p50 = 51, p95 = 96
    r = run(tmp_path, [pr("p", "x" * (n - 1)) for n in range(2, 102)])
    assert (r.length.min, r.length.p50, r.length.p95, r.length.max) == (2, 51, 96, 101)


def test_completion_is_accepted_as_response(tmp_path):
    r = run(tmp_path, [json.dumps({"prompt": "a", "completion": "b"}), pr()])
    assert r.valid and r.rows == 2


def test_final_line_without_newline_is_fine(tmp_path):
    r = run(tmp_path, pr() + "\n" + pr("x", "y"))
    assert r.valid and r.rows == 2 and r.lines == 2


def test_crlf_line_endings_are_fine(tmp_path):
    r = run(tmp_path, (pr() + "\r\n" + pr("x", "y") + "\r\n").encode())
    assert r.valid and r.rows == 2


# -- file-level problems ----------------------------------------------------------------------------


def test_missing_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as exc:
        validate(missing)
    assert str(missing) in str(exc.value)
    with pytest.raises(ConfigError, match="is not a file"):
        validate(tmp_path)


def test_empty_file(tmp_path):
    r = run(tmp_path, b"")
    assert not r.valid and codes(r) == [(None, "empty_file")] and r.rows == 0


def test_file_too_large(tmp_path):
    r = run(tmp_path, [pr()], rules=DataRules(backend="tiny", max_bytes=10))
    assert codes(r) == [(None, "file_too_large")] and "tiny" in r.problems[0].message


def test_too_few_rows_names_backend_and_note(tmp_path):
    rules = DataRules(backend="openai", min_rows=10, note="OpenAI needs at least 10 examples")
    r = run(tmp_path, [pr(), pr("a", "b")], rules=rules)
    assert codes(r) == [(None, "too_few_rows")]
    msg = r.problems[0].message
    assert "2 valid row(s)" in msg and "at least 10" in msg and "OpenAI needs" in msg
    assert r.backend == "openai"


def test_kind_not_accepted(tmp_path):
    rules = DataRules(backend="fw", kinds={RowKind.CHAT})
    r = run(tmp_path, ["", pr()], rules=rules)
    assert codes(r) == [(1, "blank_line"), (2, "kind_not_accepted")]
    assert "convert_file" in r.problems[1].message


def test_preference_rows_without_dpo_say_to_set_the_method():
    from tunekit.backends.base import Backend
    from tunekit.schemas.spec import TrainingSpec
    from tests.fake_backend import FakeBackend

    sft, dpo = TrainingSpec(base_model="m"), TrainingSpec(base_model="m", method="dpo")
    r = validate(EXAMPLES / "preference.jsonl", rules=FakeBackend().data_rules(sft))
    assert codes(r) == [(1, "kind_not_accepted")]
    assert "with this spec" in r.problems[0].message and "set it in the spec (CLI: finetune --set method=dpo, validate --method dpo)" in r.problems[0].message
    r = validate(EXAMPLES / "chat.jsonl", rules=FakeBackend().data_rules(dpo))
    assert codes(r) == [(1, "kind_not_accepted")] and "--set method=sft" in r.problems[0].message

    class NoPreference(FakeBackend):  # a backend that never trains on preference rows: no such advice
        row_kinds = frozenset({"chat"})

    assert issubclass(NoPreference, Backend)
    r = validate(EXAMPLES / "preference.jsonl", rules=NoPreference().data_rules(sft))
    assert codes(r) == [(1, "kind_not_accepted")] and "method" not in r.problems[0].message


def test_kinds_accepted_as_strings(tmp_path):
    rules = DataRules(kinds={"chat", "prompt_response"})
    assert run(tmp_path, [pr()], rules=rules).valid


# -- line-level problems ----------------------------------------------------------------------------


def test_not_utf8(tmp_path):
    r = run(tmp_path, pr().encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n' + pr("b", "c").encode() + b"\n")
    assert codes(r) == [(2, "not_utf8")] and r.rows == 2
    assert "0xe9" in r.problems[0].message


def test_utf16_file_is_called_out(tmp_path):
    r = run(tmp_path, (pr() + "\n").encode("utf-16"))
    assert r.problems[0].code == "not_utf8" and "UTF-16" in r.problems[0].message


def test_bom_at_start(tmp_path):
    r = run(tmp_path, b"\xef\xbb\xbf" + (pr() + "\n").encode())
    assert codes(r) == [(1, "bom")] and r.rows == 1  # the row itself is still read


def test_blank_lines(tmp_path):
    r = run(tmp_path, [pr(), "", "   ", pr("a", "b")])
    assert codes(r) == [(2, "blank_line"), (3, "blank_line")] and r.rows == 2


def test_truncated_last_line(tmp_path):
    r = run(tmp_path, pr() + "\n" + '{"prompt": "a", "resp')
    assert codes(r) == [(2, "truncated_line")] and r.lines == 2


def test_invalid_json_mid_file(tmp_path):
    r = run(tmp_path, [pr(), '{"prompt": "a" "response": "b"}', pr("c", "d")])
    assert codes(r) == [(2, "invalid_json")]


def test_nan_is_not_json(tmp_path):
    r = run(tmp_path, [pr(), '{"prompt": "a", "response": NaN}'])
    assert codes(r) == [(2, "invalid_json")] and "NaN" in r.problems[0].message


def test_lone_surrogate_escapes_are_refused_with_line_and_field(tmp_path, monkeypatch):
    rows = [pr(), r'{"prompt": "a\ud800b", "response": "x"}',  # a lone high surrogate
            r'{"prompt": "a", "response": "\uDC00"}',  # a lone low one, upper-case hex
            chat(("user", "q"), ("assistant", "ok")).replace('"ok"', r'"ok \udfff"'),
            r'{"prompt": "a", "response": "x", "\ud83d": 1}',  # in a key
            r'{"prompt": "\ud83d\ude00 fine", "response": "x"}',  # a pair is one character: valid
            r'{"prompt": "\\ud800 is text", "response": "x"}']  # an escaped backslash: valid text
    for fast in (True, False):
        monkeypatch.setattr(vmod, "FAST_PATH", fast)
        r = run(tmp_path, rows)
        assert codes(r)[:3] == [(2, "lone_surrogate"), (3, "lone_surrogate"), (4, "lone_surrogate")]
        assert codes(r)[3] == (5, "lone_surrogate") and r.rows == 3
        assert [p.field for p in r.problems[:4]] == ["prompt", "response", "messages[1].content", None]
        assert "\\ud800) at character 2" in r.problems[0].message
        assert "\\udc00" in r.problems[1].message and "a key" in r.problems[3].message


def test_lone_surrogate_under_a_huge_key_is_named_short(tmp_path):
    key = "k" * 10**6
    r = run(tmp_path, [pr(), '{"prompt": "a", "response": "b", "%s": {"x": "\\ud800"}}' % key])
    assert codes(r) == [(2, "lone_surrogate")]
    assert len(r.problems[0].field) < 100 and len(r.problems[0].message) < 400, r.problems[0]


def test_lone_surrogate_in_a_chat_file_past_the_first_row(tmp_path):
    # the fast path takes over once the kind is known; it must not let the escape through
    good = chat(("user", "q"), ("assistant", "ok"))
    bad = good.replace('"q"', r'"q\ud800"')
    r = run(tmp_path, [good, chat(("user", "q2"), ("assistant", "ok")), bad])
    assert codes(r) == [(3, "lone_surrogate")] and r.problems[0].field == "messages[0].content"


def test_not_an_object(tmp_path):
    r = run(tmp_path, [pr(), '["a", "b"]', '"text"', "3"])
    assert codes(r) == [(2, "not_object"), (3, "not_object"), (4, "not_object")]


def test_unknown_key_suggests_the_close_name(tmp_path):
    r = run(tmp_path, [pr(), '{"prompt": "a", "respnse": "b"}'])
    assert codes(r) == [(2, "unknown_key"), (2, "missing_key")]
    assert "did you mean 'response'" in r.problems[0].message and r.problems[0].field == "respnse"


def _validate_in_subprocess(path: Path, max_tokens: int | None = None, timeout: float = 60) -> dict:
    """validate() in a fresh interpreter: its wall time, the peak of Python allocations (tracemalloc, so
    the figure does not depend on the test process) and what it reports."""
    import subprocess
    import sys

    code = ("import json, sys, time, tracemalloc; tracemalloc.start(); from tunekit.data import validate; "
            "from tunekit.schemas.report import DataRules; t = time.monotonic(); "
            f"r = validate(sys.argv[1], rules=DataRules(max_tokens={max_tokens!r})); "
            "print(json.dumps({'seconds': time.monotonic() - t, 'peak_mib': tracemalloc.get_traced_memory()[1] / 2**20, "
            "'lines': r.format_lines(), 'codes': [(p.line, p.code) for p in r.problems]}))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout,
                         check=True).stdout
    return json.loads(out)


def test_a_huge_unknown_key_costs_little_and_is_echoed_short(tmp_path):
    key = "x" * (20 * 2**20)  # 20 MiB: the close-match search and the echo must not scale with it
    path = write(tmp_path, [pr(), json.dumps({"prompt": "a", "response": "c", key: 1})])
    r = _validate_in_subprocess(path)
    assert r["codes"] == [[2, "unknown_key"]]
    assert sum(len(line) for line in r["lines"]) < 1000 and "20,971,520 characters" in r["lines"][0]
    # the file is 20 MiB; reading, parsing and holding the key take a few copies of it, not 1 GB
    assert r["peak_mib"] < 10 * 20 and r["seconds"] < 10, r


def test_many_unknown_keys_are_summarised(tmp_path):
    row = {"prompt": "a", "response": "b", **{f"k{i}": i for i in range(1000)}}
    r = run(tmp_path, [pr(), json.dumps(row)])
    assert [p.code for p in r.problems] == ["unknown_key"] * 6 and "995 more unknown keys" in r.problems[-1].message


def test_huge_values_are_echoed_short(tmp_path):
    role = "r" * 10**6
    r = run(tmp_path, [chat(("user", "q"), ("assistant", "ok")),
                       chat(("user", "q"), ("assistant", "a", {"weight": [0] * 10**5})),
                       chat(("user", "q"), (role, "a"))])
    assert [p.code for p in r.problems] == ["invalid_weight", "invalid_role"]
    assert all(len(p.message) < 200 for p in r.problems), [len(p.message) for p in r.problems]


def test_unknown_row_kind(tmp_path):
    r = run(tmp_path, ['{"text": "hello"}', '{"conversations": []}'])
    assert codes(r)[:2] == [(1, "unknown_row_kind"), (2, "unknown_row_kind")]
    assert "ShareGPT" in r.problems[1].message


def test_missing_key(tmp_path):
    r = run(tmp_path, [pr(), '{"prompt": "a"}'])
    assert codes(r) == [(2, "missing_key")] and r.problems[0].field == "response"


def test_wrong_types(tmp_path):
    r = run(tmp_path, [pr(), '{"prompt": 1, "response": null}', '{"messages": "hi"}'])
    assert codes(r)[:2] == [(2, "wrong_type"), (2, "wrong_type")]
    assert [p.field for p in r.problems[:2]] == ["prompt", "response"]
    assert "integer" in r.problems[0].message


def test_empty_and_whitespace_strings(tmp_path):
    r = run(tmp_path, [pr(), pr("", "x"), pr("x", "  \n")])
    assert codes(r) == [(2, "empty_string"), (3, "empty_string")]
    assert [p.field for p in r.problems] == ["prompt", "response"]


def test_response_and_completion_together(tmp_path):
    r = run(tmp_path, ['{"prompt": "a", "response": "b", "completion": "c"}'])
    assert (1, "conflicting_keys") in codes(r)


def test_mixed_kinds_decided_by_first_valid_row(tmp_path):
    r = run(tmp_path, ['{"prompt": ""}', chat(("user", "hi"), ("assistant", "yo")), pr(), pref()])
    assert r.kind is RowKind.CHAT
    assert codes(r)[-2:] == [(3, "mixed_kinds"), (4, "mixed_kinds")]
    assert "line 2" in r.problems[-1].message


def test_duplicate_rows_name_first_occurrence(tmp_path):
    r = run(tmp_path, [pr(), pr("a", "b"), pr(), pr("a", "b"), pr()])
    assert codes(r) == [(3, "duplicate_row"), (4, "duplicate_row"), (5, "duplicate_row")]
    assert [p.message.split(":")[0] for p in r.problems] == [
        "duplicate of line 1", "duplicate of line 2", "duplicate of line 1"]
    assert r.rows == 2


def test_duplicate_of_bom_first_line(tmp_path):
    r = run(tmp_path, b"\xef\xbb\xbf" + (pr() + "\n" + pr() + "\n").encode())
    assert codes(r) == [(1, "bom"), (2, "duplicate_row")] and "line 1" in r.problems[1].message


# -- chat rows --------------------------------------------------------------------------------------


def test_chat_role_order(tmp_path):
    rows = [
        chat(("user", "a"), ("assistant", "b")),                          # 1 ok
        chat(("user", "a"), ("system", "s"), ("assistant", "b")),         # 2 system not first
        chat(("user", "a"), ("user", "a2"), ("assistant", "b")),          # 3 user twice
        chat(("system", "s"), ("assistant", "b")),                        # 4 assistant first
        chat(("user", "a"), ("tool", "42"), ("assistant", "b")),          # 5 tool after user
        chat(("user", "a"), ("assistant", "b"), ("user", "c")),           # 6 ends with user
    ]
    r = run(tmp_path, rows)
    assert codes(r) == [(n, "role_order") for n in range(2, 7)]
    fields = [p.field for p in r.problems]
    assert fields == ["messages[1].role", "messages[1].role", "messages[1].role", "messages[1].role",
                      "messages[2].role"]
    assert "system message is only allowed first" in r.problems[0].message


def test_chat_tool_turns(tmp_path):
    call = {"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}
    row = json.dumps({
        "tools": [{"type": "function", "function": {"name": "add"}}],
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", **call},
                     {"role": "tool", "content": "4", "tool_call_id": "c1"}, {"role": "assistant", "content": "4"}],
    })
    assert run(tmp_path, [row]).valid
    bad = json.dumps({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"},
                                   {"role": "assistant", "content": "y"}]})
    assert codes(run(tmp_path, [bad])) == [(1, "misplaced_key"), (None, "too_few_rows")]


def test_chat_invalid_role(tmp_path):
    r = run(tmp_path, [chat(("user", "a"), ("bot", "b"))])
    assert codes(r) == [(1, "invalid_role"), (None, "too_few_rows")] and r.problems[0].field == "messages[1].role"


def test_chat_nothing_to_train_on(tmp_path):
    r = run(tmp_path, [chat(("system", "s"), ("user", "a"), ("assistant", "b", {"weight": 0})),
                       json.dumps({"messages": [{"role": "user", "content": "a"}]})])
    assert codes(r)[:2] == [(1, "no_assistant"), (2, "role_order")]
    assert "weight 0" in r.problems[0].message


def test_chat_weights(tmp_path):
    ok = chat(("user", "a"), ("assistant", "b", {"weight": 0}), ("user", "c"), ("assistant", "d", {"weight": 1}))
    r = run(tmp_path, [ok, chat(("user", "a"), ("assistant", "b", {"weight": 2})),
                       chat(("user", "a"), ("assistant", "b", {"weight": True})),
                       chat(("user", "a", {"weight": 1}), ("assistant", "b"))])
    assert codes(r) == [(2, "invalid_weight"), (3, "invalid_weight"), (4, "misplaced_key")]
    assert r.problems[0].field == "messages[1].weight"


def test_chat_message_shape(tmp_path):
    r = run(tmp_path, [json.dumps({"messages": [{"role": "user"}, "hi", {"role": "assistant", "content": ""}]}),
                       json.dumps({"messages": []}), json.dumps({"messages": [], "extra": 1})])
    assert codes(r) == [(1, "missing_key"), (1, "wrong_type"), (1, "empty_string"), (2, "empty_messages"),
                        (3, "unknown_key"), (3, "empty_messages"), (None, "too_few_rows")]
    assert [p.field for p in r.problems[:3]] == ["messages[0].content", "messages[1]", "messages[2].content"]


# -- preference rows --------------------------------------------------------------------------------


def test_preference_problems(tmp_path):
    r = run(tmp_path, [
        pref(),                                                                     # 1 ok
        pref(inp=(("user", "q"), ("assistant", "a"))),                              # 2 input ends with assistant
        pref(preferred_output=[{"role": "assistant", "content": "a"}] * 2),         # 3 two outputs
        pref(non_preferred_output=[{"role": "user", "content": "a"}]),              # 4 output not assistant
        pref(good="same", bad="same"),                                              # 5 identical
        json.dumps({"input": {"messages": [{"role": "user", "content": "q"}]}}),    # 6 outputs missing
    ])
    assert codes(r) == [(2, "role_order"), (3, "wrong_type"), (4, "role_order"), (5, "identical_outputs"),
                        (6, "missing_key"), (6, "missing_key")]
    assert r.problems[0].field == "input.messages[1].role"
    assert r.problems[2].field == "non_preferred_output[0].role"


# -- caps and counting ------------------------------------------------------------------------------


def test_problems_capped_but_all_counted(tmp_path):
    r = run(tmp_path, [pr()] + ["{bad"] * 250, max_problems=10)
    assert len(r.problems) == 10 and r.problem_count == 250 and r.problem_counts == {"invalid_json": 250}
    assert r.truncated and "240 more" in r.format_lines()[-1]
    assert [p.line for p in r.problems] == list(range(2, 12))


def test_duplicates_beyond_the_cap_are_counted(tmp_path):
    r = run(tmp_path, [pr()] * 50, max_problems=3)
    assert r.problem_count == 49 and len(r.problems) == 3 and r.rows == 1
    assert all("line 1" in p.message for p in r.problems)


def test_format_lines_and_raise(tmp_path):
    path = write(tmp_path, [pr(), "[1]"])
    r = validate(path)
    assert r.format_lines() == [f"{path}:2: line is a JSON array, not an object: each line must be one row object "
                                "(not_object)"]
    with pytest.raises(DataValidationError) as exc:
        r.raise_for_problems()
    assert exc.value.report is r and "line 2" in str(exc.value)


def test_bad_example_file():
    r = validate(EXAMPLES / "bad.jsonl")
    assert codes(r) == [(2, "empty_string"), (3, "unknown_key"), (3, "missing_key"), (4, "blank_line"),
                        (5, "invalid_json"), (6, "not_object"), (7, "wrong_type"), (8, "mixed_kinds"),
                        (9, "duplicate_row")]
    assert r.rows == 2 and r.kind is RowKind.PROMPT_RESPONSE


def test_lines_across_block_boundaries(tmp_path, monkeypatch):
    """Small read blocks must give the same report as one block (lines split across reads)."""
    lines = [pr(f"p{i}", "é" * (i % 7 + 1)) for i in range(40)] + ["", "{bad", pr("p1", "éé")]
    path = write(tmp_path, lines)
    whole = validate(path)
    for block in (1, 3, 17):
        monkeypatch.setattr(vmod, "BLOCK", block)
        assert validate(path).model_dump() == whole.model_dump()


# -- rows far longer than max_length ----------------------------------------------------------------


def test_rows_far_longer_than_max_length_are_refused_with_the_line(tmp_path, monkeypatch):
    rules = DataRules(max_tokens=16)  # 16 tokens x 64 bytes: rows over 1,024 bytes
    big = pr("p", "x" * 2000)
    lines = [big, pr(), pr("q", "x" * 2000), pr("a", "b"), pr("x" * 900, "y"), pr("c", "d") + " " * 5000]
    path = write(tmp_path, lines + [pr("z", "x" * 2000)])
    path.write_bytes(path.read_bytes()[:-1])  # the last, overlong line has no newline
    whole = validate(path, rules=rules)
    assert codes(whole) == [(1, "row_too_long"), (3, "row_too_long"), (6, "row_too_long"), (7, "row_too_long")]
    assert whole.rows == 3 and whole.lines == 7
    msg = whole.problems[0].message
    assert f"row is {len(big):,} bytes" in msg and "max_length=16 tokens" in msg and "1,024 bytes" in msg
    for block in (1, 7, 100, 1500):  # an overlong line across reads is skipped, never held, and counted right
        monkeypatch.setattr(vmod, "BLOCK", block)
        assert validate(path, rules=rules).model_dump() == whole.model_dump()
    assert validate(path).valid  # without the run's max_length nothing is refused


def test_a_50mb_row_is_refused_without_holding_it(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(pr() + '\n{"prompt": "p", "response": "')
        for _ in range(50):
            f.write("x" * 2**20)
        f.write('"}\n' + pr("a", "b") + "\n")
    r = _validate_in_subprocess(path, max_tokens=2048)
    assert r["codes"] == [[2, "row_too_long"]]
    assert r["peak_mib"] < 32, r  # the 50 MiB line is streamed past in 1 MiB reads, never held whole


def test_local_runs_refuse_overlong_rows_before_training(tmp_path, tunekit_home):
    import tunekit
    from tunekit.backends.local.backend import LocalBackend
    from tunekit.schemas.spec import TrainingSpec

    spec = TrainingSpec(base_model="m", hyperparameters={"max_length": 64})
    assert LocalBackend().data_rules(spec).max_tokens == 64
    assert LocalBackend().data_rules().max_tokens == 2048  # `validate --backend local` checks what finetune would
    path = write(tmp_path, [pr(), pr("p", "x" * 5000)])
    with pytest.raises(DataValidationError) as exc:
        tunekit.finetune(path, spec, backend="local")
    assert "line 2:" in str(exc.value) and "row_too_long" in exc.value.report.problem_counts
    assert tunekit.list_jobs() == []  # refused before a job existed


# -- tokens -----------------------------------------------------------------------------------------


def test_token_lengths_with_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tunekit.testing import build_tokenizer

    tok = build_tokenizer()
    r = run(tmp_path, [pr("ab", "cde"), pr("hello", "world")], tokenizer=tok)
    assert r.valid and r.length.unit == "tokens"
    # byte-level tokenizer without merges: one token per byte (no special tokens added for plain text)
    n1, n2 = len(tok("abcde")["input_ids"]), len(tok("helloworld")["input_ids"])
    assert n1 != n2 and (r.length.min, r.length.max) == (min(n1, n2), max(n1, n2))

    rc = run(tmp_path, [chat(("user", "hi"), ("assistant", "yo"))], tokenizer=tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert rc.length.unit == "tokens" and rc.length.max == len(ids)
    assert rc.length.max > len("hiyo")  # the template's markers count too
    # without a tokenizer the same file is measured in characters
    assert validate(tmp_path / "data.jsonl").length.unit == "characters"


def test_a_whole_file_problem_in_the_error_has_no_line_none(tmp_path):
    path = write(tmp_path, [pr("p", "x" * 5000)])  # the only row refused: 0 valid rows, a whole-file problem
    r = validate(path, rules=DataRules(max_tokens=16))
    with pytest.raises(DataValidationError) as exc:
        r.raise_for_problems()
    assert "line 1: row is" in str(exc.value) and "line None" not in str(exc.value)
    assert "0 valid row(s)" in str(exc.value)
