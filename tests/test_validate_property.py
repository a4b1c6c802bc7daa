"""Property tests: validate() returns a coherent report for any bytes, never an exception."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tunekit.data.validator as vmod
from tunekit.data import validate

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = ["prompt", "response", "completion", "messages", "role", "content", "weight", "input", "preferred_output",
        "non_preferred_output", "tools", "tool_calls", "tool_call_id", "name", "x"]
ROLES = ["system", "user", "assistant", "tool", "bot"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(allow_nan=False),
                    st.sampled_from(ROLES + ["", " ", "hi"]), st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=20,
)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.sampled_from(["", "a", "b", " "])},
                                optional={"weight": st.sampled_from([0, 1, 2, True])})
rowlike = st.one_of(
    st.fixed_dictionaries({"prompt": scalars}, optional={"response": scalars, "completion": scalars, "x": scalars}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}, optional={"tools": json_values}),
    st.fixed_dictionaries({"input": st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}),
                           "preferred_output": st.lists(message, max_size=2),
                           "non_preferred_output": st.lists(message, max_size=2)}),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
)
line = st.one_of(
    rowlike.map(json.dumps),
    json_values.map(json.dumps),
    st.sampled_from(["", " ", "{", '{"prompt": "a", "response": "b"}', "[[[[[[[[", "NaN", '"\\ud800"']),
    st.text(max_size=20),
)


def _check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_bytes(data)
        r = validate(path, max_problems=5)
        assert r.valid == (r.problem_count == 0)
        assert r.problem_count >= len(r.problems) and len(r.problems) <= 5
        assert sum(r.problem_counts.values()) == r.problem_count
        assert 0 <= r.rows <= r.lines
        assert r.lines == data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
        assert r.sha256 == hashlib.sha256(data).hexdigest() and r.size_bytes == len(data)
        assert r.length.count == r.rows
        if r.rows:
            assert r.kind is not None and r.length.min <= r.length.p50 <= r.length.p95 <= r.length.max
        assert all(p.line is None or 1 <= p.line <= r.lines for p in r.problems)
        assert len(r.format_lines()) == len(r.problems) + (1 if r.truncated else 0)


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    _check(data)


@SETTINGS
@given(st.lists(line, max_size=12), st.booleans())
def test_arbitrary_json_lines(lines, final_newline):
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    _check(text.encode("utf-8", "surrogatepass"))


short = st.one_of(st.text(alphabet=" \t\nab", max_size=3), scalars)
pr_lines = st.one_of(
    st.builds(lambda p, key, r: json.dumps({"prompt": p, key: r}), short, st.sampled_from(["response", "completion"]),
              short),
    st.fixed_dictionaries({"prompt": scalars}, optional={"response": scalars, "completion": scalars}).map(json.dumps),
    st.sampled_from(['{"prompt": "a", "response": "b"}', '{"prompt": "a", "completion": "b"}', "", "{",
                     '{"prompt": "a", "response": "b", "x": 1}', '{"messages": []}']),
)


FIRST = [  # a valid first row of each kind, so that the fast path of each kind is exercised
    '{"prompt": "first", "response": "row"}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
    '{"input": {"messages": [{"role": "user", "content": "a"}]}, "preferred_output": [{"role": "assistant", '
    '"content": "yes"}], "non_preferred_output": [{"role": "assistant", "content": "no"}]}',
]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIRST), st.lists(st.one_of(pr_lines, rowlike.map(json.dumps)), min_size=1, max_size=10),
       st.integers(1, 40))
def test_block_size_and_fast_path_do_not_change_the_report(first, lines, block):
    """Reading in tiny blocks, or with the fast path off, gives the same report."""
    data = ("\n".join([first] + lines) + "\n").encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_bytes(data)
        whole = validate(path).model_dump()
        old = vmod.BLOCK, vmod.FAST_PATH
        try:
            vmod.BLOCK = block
            assert validate(path).model_dump() == whole
            vmod.BLOCK, vmod.FAST_PATH = old[0], False
            assert validate(path).model_dump() == whole
        finally:
            vmod.BLOCK, vmod.FAST_PATH = old
