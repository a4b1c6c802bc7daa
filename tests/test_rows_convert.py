"""Row models, the hand-written checks that mirror them, and conversion between row kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tunekit._exceptions import ConfigError
from tunekit.data import _checks, convert_file, convert_row, iter_rows, to_chat_row, validate
from tunekit.schemas.rows import ROW_MODELS, ChatRow, PromptResponseRow, RowKind

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

# Problems only the hand checks find: the models describe shape, the validator also checks sense.
SEMANTIC_CODES = {"role_order", "no_assistant", "identical_outputs", "empty_string", "unknown_row_kind"}


# -- models -----------------------------------------------------------------------------------------


def test_prompt_response_model():
    assert PromptResponseRow(prompt="a", completion="b").answer == "b"
    for bad in ({"prompt": "a"}, {"prompt": "a", "response": "b", "completion": "c"}, {"prompt": "a", "response": None},
                {"prompt": "", "response": "b"}, {"prompt": 1, "response": "b"}, {"prompt": "a", "response": "b", "x": 1}):
        with pytest.raises(ValidationError):
            PromptResponseRow.model_validate(bad)


def test_message_rules_in_model():
    ChatRow.model_validate({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                                           "weight": 0}]})
    for msg in ({"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b", "weight": True},
                {"role": "assistant", "content": ""}, {"role": "bot", "content": "x"},
                {"role": "user", "content": "a", "tool_calls": [{}]}):
        with pytest.raises(ValidationError):
            ChatRow.model_validate({"messages": [msg]})


# -- the hand checks agree with the models ------------------------------------------------------------

text = st.sampled_from(["a", "hello"] * 6 + ["", " "])  # mostly valid
value = st.one_of(text, st.none(), st.integers(0, 2), st.booleans(), st.lists(st.just({}), max_size=2))
msg = st.dictionaries(st.sampled_from(["role", "content", "weight", "name", "tool_calls", "tool_call_id", "x"]),
                      st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "bot"]), value),
                      max_size=4)
good_msg = st.builds(lambda role, content, extra: {"role": role, "content": content, **extra},
                     st.sampled_from(["system", "user", "assistant", "tool"]), text,
                     st.sampled_from([{}, {"weight": 0}, {"weight": 1}, {"name": "n"}]))
assistant = st.builds(lambda c, extra: {"role": "assistant", "content": c, **extra}, text,
                      st.sampled_from([{}] * 6 + [{"weight": 0}, {"weight": 1}, {"weight": 2}, {"name": "n"}]))


def _conversation(system, turns, last_user):
    out = [{"role": "system", "content": system}] if system else []
    for user, reply in turns:
        out += [{"role": "user", "content": user}, reply]
    return out + ([{"role": "user", "content": last_user}] if last_user else [])


# Well-formed conversations (then mutated by the other branches) so that both outcomes occur.
chat_msgs = st.builds(_conversation, st.one_of(st.none(), text),
                      st.lists(st.tuples(text, assistant), min_size=1, max_size=3), st.none())
input_msgs = st.builds(_conversation, st.one_of(st.none(), text), st.lists(st.tuples(text, assistant), max_size=2),
                       text)


def _mutate(conv, i, op, role):
    """One small edit of a well-formed conversation: the order mistakes people make."""
    conv = [dict(m) for m in conv]
    if not conv:
        return conv
    i %= len(conv)
    if op == "swap" and len(conv) > 1:
        j = (i + 1) % len(conv)
        conv[i], conv[j] = conv[j], conv[i]
    elif op == "repeat":
        conv.insert(i, dict(conv[i]))
    elif op == "drop":
        del conv[i]
    elif op == "insert":
        conv.insert(i, {"role": role, "content": "x"})
    elif op == "role":
        conv[i]["role"] = role
    return conv


mutated = st.builds(_mutate, st.one_of(chat_msgs, input_msgs), st.integers(0, 20),
                    st.sampled_from(["swap", "repeat", "drop", "insert", "role"]),
                    st.sampled_from(["system", "user", "assistant", "tool"]))
msgs = st.one_of(chat_msgs, input_msgs, mutated, st.lists(st.one_of(good_msg, msg), max_size=4))
one_assistant = st.builds(lambda c: [{"role": "assistant", "content": c}],
                          st.sampled_from(["yes", "no", "maybe", "sure", "never", "ok", ""]))
output = st.one_of(one_assistant, one_assistant, st.lists(assistant, min_size=1, max_size=1),
                   st.lists(good_msg, max_size=2))
rows = st.one_of(
    st.builds(lambda p, key, r: {"prompt": p, key: r}, text, st.sampled_from(["response", "completion"]), text),
    st.dictionaries(st.sampled_from(["prompt", "response", "completion", "x"]), value, max_size=3),
    st.builds(lambda m: {"messages": m}, st.one_of(chat_msgs, msgs)),
    st.builds(lambda i, p, n: {"input": {"messages": i}, "preferred_output": p, "non_preferred_output": n},
              mutated, output, output),
    st.builds(lambda i, p, n: {"input": {"messages": i}, "preferred_output": p, "non_preferred_output": n},
              st.one_of(input_msgs, input_msgs, msgs), output, output),
    st.builds(lambda q, p, n: {"input": {"messages": [{"role": "user", "content": q}]}, "preferred_output": p,
                               "non_preferred_output": n}, text, output, output),
)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_checks_agree_with_models(row):
    kind = _checks.guess_kind(row)
    if kind is None:
        return
    issues = _checks.check_row(row, kind)
    try:
        ROW_MODELS[kind].model_validate(row)
        model_ok = True
    except ValidationError:
        model_ok = False
    if not issues:
        assert model_ok, row  # everything the validator passes, the schema type accepts
    if not model_ok:
        assert issues, row  # everything the schema type rejects, the validator rejects
    if model_ok and issues:
        assert {code for _, code, _ in issues} <= SEMANTIC_CODES, (row, issues)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_fast_checks_only_pass_valid_rows(row):
    """The validator's fast path may only accept rows the full checks accept, with the same length."""
    for kind, fast in _checks.FAST_CHECKS.items():
        n = fast(row)
        if n is not None:
            assert _checks.guess_kind(row) is kind and _checks.check_row(row, kind) == [], row
            assert n == _checks.text_chars(row, kind)


@settings(max_examples=300, deadline=None)
@given(mutated, output, output)
def test_fast_checks_on_edited_conversations(conv, good, bad):
    for row in ({"messages": conv}, {"input": {"messages": conv}, "preferred_output": good,
                                     "non_preferred_output": bad}):
        kind = _checks.guess_kind(row)
        n = _checks.FAST_CHECKS[kind](row)
        issues = _checks.check_row(row, kind)
        assert (n is not None) <= (issues == []), (row, issues)


def test_fast_checks_take_the_common_shapes():
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "u2"},
                         {"role": "assistant", "content": "a2"}]}
    assert _checks.fast_chat(chat) == 7
    for _, row in iter_rows(EXAMPLES / "preference.jsonl"):
        assert _checks.fast_preference(row) == _checks.text_chars(row, RowKind.PREFERENCE)


# -- conversion -------------------------------------------------------------------------------------


def test_to_chat_row():
    assert to_chat_row({"prompt": "p", "response": "r"}, RowKind.PROMPT_RESPONSE) == {
        "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}
    assert to_chat_row({"prompt": "p", "completion": "c"}, "prompt_response")["messages"][1]["content"] == "c"
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert to_chat_row(row, RowKind.CHAT) is row
    pref = {"input": {"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}]}
    assert to_chat_row(pref, RowKind.PREFERENCE) == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "tools": [{"type": "function"}]}
    with pytest.raises(ConfigError):
        to_chat_row(row, "sharegpt")


def test_convert_row_refuses_impossible():
    with pytest.raises(ConfigError, match="cannot convert chat rows to prompt_response"):
        convert_row({"messages": []}, "chat", "prompt_response")
    with pytest.raises(ConfigError, match="cannot convert prompt_response rows to preference"):
        convert_row({"prompt": "a", "response": "b"}, RowKind.PROMPT_RESPONSE, RowKind.PREFERENCE)
    assert convert_row({"prompt": "a", "completion": "b"}, "prompt_response", "prompt_response") == {
        "prompt": "a", "response": "b"}


def test_convert_file_prompt_response_to_chat(tmp_path):
    dst = tmp_path / "chat.jsonl"
    n = convert_file(EXAMPLES / "train.jsonl", dst, RowKind.CHAT)
    assert n == 92
    report = validate(dst)
    assert report.valid and report.kind is RowKind.CHAT and report.rows == 92
    src_rows = [r for _, r in iter_rows(EXAMPLES / "train.jsonl")]
    out_rows = [r for _, r in iter_rows(dst)]
    assert out_rows[0] == to_chat_row(src_rows[0], RowKind.PROMPT_RESPONSE)
    assert [r["messages"][0]["content"] for r in out_rows] == [r["prompt"] for r in src_rows]


def test_convert_file_preference_to_chat_and_identity(tmp_path):
    assert convert_file(EXAMPLES / "preference.jsonl", tmp_path / "c.jsonl", "chat") == 40
    assert validate(tmp_path / "c.jsonl").kind is RowKind.CHAT
    assert convert_file(EXAMPLES / "chat.jsonl", tmp_path / "same.jsonl", "chat") == 40
    assert [r for _, r in iter_rows(tmp_path / "same.jsonl")] == [r for _, r in iter_rows(EXAMPLES / "chat.jsonl")]


def test_convert_file_refuses_impossible_before_writing(tmp_path):
    dst = tmp_path / "out.jsonl"
    with pytest.raises(ConfigError, match="cannot convert chat rows to preference"):
        convert_file(EXAMPLES / "chat.jsonl", dst, RowKind.PREFERENCE)
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_convert_file_names_bad_line_and_leaves_no_output(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "", "response": "b"}\n')
    dst = tmp_path / "dst.jsonl"
    with pytest.raises(ConfigError, match=r"src.jsonl:2: 'prompt' is empty"):
        convert_file(src, dst, "chat")
    assert not dst.exists() and not (tmp_path / "dst.jsonl.tmp").exists()
    with pytest.raises(ConfigError, match="destination is the source"):
        convert_file(src, src, "chat")


def test_convert_file_non_ascii_and_surrogates(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text('{"prompt": "café ☕", "response": "ok"}\n{"prompt": "bad \\ud800", "response": "x"}\n',
                   encoding="utf-8")
    dst = tmp_path / "dst.jsonl"
    assert convert_file(src, dst, "chat") == 2
    lines = dst.read_bytes().splitlines()
    assert "café ☕".encode() in lines[0] and b"\\ud800" in lines[1]  # converted as is, not lost...
    report = validate(dst)  # ...and still refused with its line: a lone surrogate is no text to train on
    assert [(p.line, p.code) for p in report.problems] == [(2, "lone_surrogate")] and report.rows == 1


def test_iter_rows(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"b": 2}\n')
    assert list(iter_rows(p)) == [(1, {"a": 1}), (3, {"b": 2})]
    p.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(ConfigError, match="x.jsonl:2"):
        list(iter_rows(p))
    with pytest.raises(ConfigError, match="no such file"):
        list(iter_rows(tmp_path / "missing.jsonl"))


def test_iter_rows_streams(tmp_path):
    """iter_rows is lazy: it yields the first row before reading the rest."""
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n' + "not json\n")
    it = iter_rows(p)
    assert next(it) == (1, {"a": 1})
    with pytest.raises(ConfigError):
        next(it)


def test_convert_file_many_rows(tmp_path):
    """Thousands of rows convert in order, with their line numbers kept."""
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(5000):
            f.write(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n")
    assert convert_file(src, tmp_path / "out.jsonl", "chat") == 5000
    last = list(iter_rows(tmp_path / "out.jsonl"))[-1]
    assert last == (5000, {"messages": [{"role": "user", "content": "q4999"}, {"role": "assistant", "content": "a4999"}]})
