"""Hand-written row checks: the rules of ``tunekit.schemas.rows`` in plain Python.

Pydantic per row is several times slower than the JSON parse itself, so the validator checks the
shape of each parsed dict here. Each check returns a list of issues ``(field, code, message)``;
an empty list means the row is valid. Messages say what to do next when that is not obvious.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Optional

from tunekit.schemas.rows import ROLES, RowKind

Issue = tuple[Optional[str], str, str]

PR_KEYS = ("prompt", "response", "completion")
CHAT_KEYS = ("messages", "tools")
PREF_KEYS = ("input", "preferred_output", "non_preferred_output")
PREF_INPUT_KEYS = ("messages", "tools")
MESSAGE_KEYS = ("role", "content", "weight", "name", "tool_calls", "tool_call_id")

KIND_SHAPES = {
    RowKind.PROMPT_RESPONSE: '{"prompt": ..., "response": ...}',
    RowKind.CHAT: '{"messages": [...]}',
    RowKind.PREFERENCE: '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}',
}

_JSON_TYPE = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_TYPE.get(type(value), type(value).__name__)


def guess_kind(obj: dict) -> Optional[RowKind]:
    """The kind a row is trying to be, from its keys (None when it looks like none of them)."""
    if "messages" in obj:
        return RowKind.CHAT
    if "input" in obj or "preferred_output" in obj or "non_preferred_output" in obj:
        return RowKind.PREFERENCE
    if "prompt" in obj or "response" in obj or "completion" in obj:
        return RowKind.PROMPT_RESPONSE
    return None


# What a message echoes of the data: a row may hold megabytes in one key or value
CLIP = 40
# Keys longer than this are not compared with the allowed names (none is close to them)
COMPARE_CHARS = 64
# Unknown keys listed per object; the rest are counted in one issue
MAX_UNKNOWN_KEYS = 5


def clip(value: Any) -> str:
    """repr of a value from the data, cut to CLIP characters (with the full length) when longer."""
    if type(value) is str and len(value) > CLIP:
        return f"{value[:CLIP]!r}... ({len(value):,} characters)"
    text = repr(value) if type(value) in (str, int, float, bool) or value is None else json_type(value)
    return text if len(text) <= CLIP else text[:CLIP] + "..."


def unknown_kind_issue(obj: dict) -> Issue:
    keys = ", ".join(clip(k) for k in list(obj)[:8]) or "no keys"
    hint = "use one of: " + "; ".join(KIND_SHAPES.values())
    if "conversations" in obj:
        hint = "ShareGPT 'conversations' rows are not read: rename to 'messages' with {'role', 'content'} items"
    elif "text" in obj:
        hint = "plain 'text' rows are not supported: split them into prompt/response or chat messages"
    return None, "unknown_row_kind", f"row has {keys}; it is no known row kind: {hint}"


def _unknown_keys(obj: dict, allowed: tuple[str, ...], prefix: str, out: list[Issue]) -> None:
    unknown = [key for key in obj if key not in allowed]
    for key in unknown[:MAX_UNKNOWN_KEYS]:
        close = difflib.get_close_matches(key, allowed, n=1) if len(key) <= COMPARE_CHARS else []
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
        name = key if len(key) <= CLIP else key[:CLIP] + "..."
        out.append((f"{prefix}{name}", "unknown_key", f"unknown key {clip(key)}: {hint}"))
    if len(unknown) > MAX_UNKNOWN_KEYS:
        out.append((prefix.rstrip(".") or None, "unknown_key",
                    f"and {len(unknown) - MAX_UNKNOWN_KEYS:,} more unknown keys; allowed keys: {', '.join(allowed)}"))


def _text(value: Any, field: str, out: list[Issue]) -> bool:
    """A required non-empty string. True when it is one."""
    if type(value) is not str:
        out.append((field, "wrong_type", f"'{field}' must be a string, not {json_type(value)}"))
        return False
    if not value or value.isspace():
        out.append((field, "empty_string", f"'{field}' is empty: give it text, or drop the row"))
        return False
    return True


def check_prompt_response(obj: dict) -> list[Issue]:
    out: list[Issue] = []
    _unknown_keys(obj, PR_KEYS, "", out)
    if "prompt" not in obj:
        out.append(("prompt", "missing_key", "missing key 'prompt'"))
    else:
        _text(obj["prompt"], "prompt", out)
    has_r, has_c = "response" in obj, "completion" in obj
    if has_r and has_c:
        out.append(("completion", "conflicting_keys", "both 'response' and 'completion' given: keep one"))
    elif not (has_r or has_c):
        out.append(("response", "missing_key", "missing key 'response' (or 'completion')"))
    else:
        key = "response" if has_r else "completion"
        _text(obj[key], key, out)
    return out


def _check_tools(value: Any, field: str, out: list[Issue]) -> None:
    if type(value) is not list or any(type(t) is not dict for t in value):
        out.append((field, "wrong_type", f"'{field}' must be an array of objects (tool definitions)"))


def _check_message(msg: Any, f: str, out: list[Issue]) -> Optional[str]:
    """Check one message; return its role when that is valid (for the order check)."""
    if type(msg) is not dict:
        out.append((f, "wrong_type", f"'{f}' must be an object with 'role' and 'content', not {json_type(msg)}"))
        return None
    _unknown_keys(msg, MESSAGE_KEYS, f + ".", out)
    role = msg.get("role")
    if "role" not in msg:
        out.append((f + ".role", "missing_key", "missing key 'role'"))
        role = None
    elif type(role) is not str:
        out.append((f + ".role", "wrong_type", f"'role' must be a string, not {json_type(role)}"))
        role = None
    elif role not in ROLES:
        out.append((f + ".role", "invalid_role", f"role {clip(role)} is not one of {', '.join(ROLES)}"))
        role = None
    tool_calls = msg.get("tool_calls")
    if "tool_calls" in msg:
        if role != "assistant":
            out.append((f + ".tool_calls", "misplaced_key", "'tool_calls' is only allowed on assistant messages"))
        elif type(tool_calls) is not list or not tool_calls or any(type(c) is not dict for c in tool_calls):
            out.append((f + ".tool_calls", "wrong_type", "'tool_calls' must be a non-empty array of objects"))
    if "content" in msg:
        content = msg["content"]
        if not (role == "assistant" and tool_calls and (content is None or content == "")):
            _text(content, f + ".content", out)
    elif not (role == "assistant" and tool_calls):
        out.append((f + ".content", "missing_key", "missing key 'content'"))
    if "weight" in msg:
        w = msg["weight"]
        if role != "assistant":
            out.append((f + ".weight", "misplaced_key", "'weight' is only allowed on assistant messages"))
        elif type(w) is not int or w not in (0, 1):
            out.append((f + ".weight", "invalid_weight", f"'weight' must be 0 or 1, not {clip(w)}"))
    if "tool_call_id" in msg:
        if role != "tool":
            out.append((f + ".tool_call_id", "misplaced_key", "'tool_call_id' is only allowed on tool messages"))
        elif type(msg["tool_call_id"]) is not str or not msg["tool_call_id"]:
            out.append((f + ".tool_call_id", "wrong_type", "'tool_call_id' must be a non-empty string"))
    if "name" in msg and (type(msg["name"]) is not str or not msg["name"]):
        out.append((f + ".name", "wrong_type", "'name' must be a non-empty string"))
    return role


# Which role may follow which (None = start of the conversation).
_MAY_FOLLOW = {
    "system": (None,),
    "user": (None, "system", "assistant"),
    "assistant": ("user", "tool"),
    "tool": ("assistant", "tool"),
}


def _order_issue(role: str, prev: Optional[str], i: int, f: str) -> Issue:
    if role == "system":
        msg = "a system message is only allowed first: merge it into the first one"
    elif role == prev:
        msg = f"two {role} messages in a row (messages {i - 1} and {i}): merge them, or put the other turn between"
    elif role == "assistant":
        msg = "an assistant message must answer a user (or tool) message: start the conversation with a user turn"
    elif role == "tool":
        msg = "a tool message must follow an assistant message that called the tool"
    else:
        msg = f"a user message cannot follow a {prev} message"
    return f, "role_order", msg


def check_messages(msgs: Any, prefix: str, out: list[Issue], *, end: str) -> list[dict]:
    """Check a message list; ``end`` is the role it must end with ('assistant' or 'user').

    Returns the assistant messages (for the caller's 'something to train on' check).
    """
    field = prefix + "messages"
    if type(msgs) is not list:
        out.append((field, "wrong_type", f"'{field}' must be an array of messages, not {json_type(msgs)}"))
        return []
    if not msgs:
        out.append((field, "empty_messages", f"'{field}' is empty"))
        return []
    prev: Optional[str] = None
    order_ok = True
    assistants = []
    for i, msg in enumerate(msgs):
        f = f"{field}[{i}]"
        role = _check_message(msg, f, out)
        if role is None:
            order_ok = False
            continue
        if role == "assistant":
            assistants.append(msg)
        if order_ok and prev not in _MAY_FOLLOW[role]:
            out.append(_order_issue(role, prev, i, f + ".role"))
            order_ok = False  # one order problem per conversation is enough to act on
        prev = role
    if order_ok and prev != end and not (end == "assistant" and prev is None):
        what = "end with the assistant reply to learn" if end == "assistant" else "end with a user turn (the outputs answer it)"
        out.append((f"{field}[{len(msgs) - 1}].role", "role_order", f"last message is {prev!r}: {what}"))
    return assistants


def check_chat(obj: dict) -> list[Issue]:
    out: list[Issue] = []
    _unknown_keys(obj, CHAT_KEYS, "", out)
    if "tools" in obj:
        _check_tools(obj["tools"], "tools", out)
    if "messages" not in obj:
        out.append(("messages", "missing_key", "missing key 'messages'"))
        return out
    n_before = len(out)
    assistants = check_messages(obj["messages"], "", out, end="assistant")
    if len(out) == n_before and type(obj["messages"]) is list:
        if not assistants:
            out.append(("messages", "no_assistant", "no assistant message: nothing to train on"))
        elif all(m.get("weight", 1) == 0 for m in assistants):
            out.append(("messages", "no_assistant", "every assistant message has weight 0: nothing to train on"))
    return out


def _check_output(value: Any, field: str, out: list[Issue]) -> None:
    if type(value) is not list or len(value) != 1:
        n = f"{len(value)} items" if type(value) is list else json_type(value)
        out.append((field, "wrong_type", f"'{field}' must be an array of exactly one assistant message, not {n}"))
        return
    f = field + "[0]"
    role = _check_message(value[0], f, out)
    if role is not None and role != "assistant":
        out.append((f + ".role", "role_order", f"'{field}' must hold an assistant message, not {role!r}"))
    if type(value[0]) is dict and "weight" in value[0]:
        out.append((f + ".weight", "misplaced_key", "'weight' has no meaning in a preference output: remove it"))


def check_preference(obj: dict) -> list[Issue]:
    out: list[Issue] = []
    _unknown_keys(obj, PREF_KEYS, "", out)
    inp = obj.get("input")
    if "input" not in obj:
        out.append(("input", "missing_key", "missing key 'input' ({'messages': [...]})"))
    elif type(inp) is not dict:
        out.append(("input", "wrong_type", f"'input' must be an object with 'messages', not {json_type(inp)}"))
    else:
        _unknown_keys(inp, PREF_INPUT_KEYS, "input.", out)
        if "tools" in inp:
            _check_tools(inp["tools"], "input.tools", out)
        if "messages" not in inp:
            out.append(("input.messages", "missing_key", "missing key 'input.messages'"))
        else:
            for m in check_messages(inp["messages"], "input.", out, end="user"):
                if "weight" in m:
                    out.append(("input.messages", "misplaced_key", "'weight' has no meaning in a preference input"))
                    break
    for key in ("preferred_output", "non_preferred_output"):
        if key not in obj:
            out.append((key, "missing_key", f"missing key {key!r} (an array of one assistant message)"))
        else:
            _check_output(obj[key], key, out)
    if not out and obj["preferred_output"] == obj["non_preferred_output"]:
        out.append(("non_preferred_output", "identical_outputs", "preferred and non-preferred outputs are identical"))
    return out


CHECKS = {
    RowKind.PROMPT_RESPONSE: check_prompt_response,
    RowKind.CHAT: check_chat,
    RowKind.PREFERENCE: check_preference,
}


def check_row(obj: dict, kind: RowKind) -> list[Issue]:
    return CHECKS[kind](obj)


def _content_chars(msgs: list) -> int:
    return sum(len(m["content"]) for m in msgs if type(m.get("content")) is str)


def text_chars(obj: dict, kind: RowKind) -> int:
    """Characters of text in a valid row (for preference: the input plus the longer output)."""
    if kind is RowKind.PROMPT_RESPONSE:
        answer = obj["response"] if "response" in obj else obj["completion"]
        return len(obj["prompt"]) + len(answer)
    if kind is RowKind.CHAT:
        return _content_chars(obj["messages"])
    return _content_chars(obj["input"]["messages"]) + max(
        _content_chars(obj["preferred_output"]), _content_chars(obj["non_preferred_output"])
    )


# -- lone surrogates ---------------------------------------------------------------------------------
# JSON may spell UTF-16 surrogates as escapes ("\ud800"); Python decodes a lone one into a str that
# cannot be encoded, which crashes a tokenizer later. Raw UTF-8 cannot hold one (strict decoding
# refuses it), so only lines with such an escape need the exact check.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def lone_surrogate(obj: Any) -> Optional[Issue]:
    """The first key or string of a parsed row holding a lone surrogate, as an issue (None when none)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, v = stack.pop()
        if type(v) is dict:
            for k in reversed(list(v)):
                if _bad_position(k) is not None:
                    return _surrogate_issue(_short_path(path) or None, k, "a key")
                name = k if len(k) <= CLIP else k[:CLIP] + "..."
                stack.append((f"{path}.{name}" if path else name, v[k]))
        elif type(v) is list:
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(v))))
        elif type(v) is str and _bad_position(v) is not None:
            return _surrogate_issue(_short_path(path), v, f"'{_short_path(path)}'")
    return None


def _short_path(path: str) -> str:  # deep nesting makes long paths: keep the end, where the value is
    return path if len(path) <= 4 * CLIP else "..." + path[-4 * CLIP:]


def _bad_position(s: str) -> Optional[int]:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _surrogate_issue(field: Optional[str], s: str, what: str) -> Issue:
    i = _bad_position(s) or 0
    return (field, "lone_surrogate",
            f"{what} holds a lone UTF-16 surrogate escape (\\u{ord(s[i]):04x}) at character {i + 1}: it is no "
            "character; fix the escape (only a high + low pair such as \\ud83d\\ude00 makes one) or remove it")


# -- fast checks ------------------------------------------------------------------------------------
# Plain type checks of the common valid shapes (no tools, no names). They return the row's character
# count when the row is certainly valid, or None: then the full checks above decide and explain.
# tests/test_rows_convert.py asserts that a row they pass has no issues under the full checks.


def _fast_messages(msgs: Any, chat: bool) -> Optional[int]:
    if type(msgs) is not list or not msgs:
        return None
    prev = None
    trained = False
    chars = 0
    for m in msgs:
        if type(m) is not dict:
            return None
        content = m.get("content")
        if type(content) is not str or not content or content.isspace():
            return None
        role = m.get("role")
        n = len(m)
        if role == "user":
            if n != 2 or (prev is not None and prev != "system" and prev != "assistant"):
                return None
        elif role == "assistant":
            if prev != "user":
                return None
            if n == 2:
                trained = True
            elif not chat or n != 3:
                return None
            else:
                w = m.get("weight")
                if type(w) is not int or (w != 0 and w != 1):
                    return None
                trained = trained or w == 1
        elif role == "system":
            if n != 2 or prev is not None:
                return None
        else:
            return None
        chars += len(content)
        prev = role
    if chat:
        return chars if prev == "assistant" and trained else None
    return chars if prev == "user" else None


def fast_chat(obj: dict) -> Optional[int]:
    if len(obj) != 1:
        return None
    return _fast_messages(obj.get("messages"), True)


def _fast_output(value: Any) -> Optional[str]:
    if type(value) is not list or len(value) != 1:
        return None
    m = value[0]
    if type(m) is not dict or len(m) != 2 or m.get("role") != "assistant":
        return None
    content = m.get("content")
    if type(content) is not str or not content or content.isspace():
        return None
    return content


def fast_preference(obj: dict) -> Optional[int]:
    inp = obj.get("input")
    if len(obj) != 3 or type(inp) is not dict or len(inp) != 1:
        return None
    chars = _fast_messages(inp.get("messages"), False)
    good = _fast_output(obj.get("preferred_output"))
    bad = _fast_output(obj.get("non_preferred_output"))
    if chars is None or good is None or bad is None or good == bad:
        return None
    return chars + max(len(good), len(bad))


FAST_CHECKS = {RowKind.CHAT: fast_chat, RowKind.PREFERENCE: fast_preference}
