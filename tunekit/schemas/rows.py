"""The three kinds of training row, as pydantic models.

These models are the *types* of the data (and the source of the JSON Schemas under ``schemas/``).
The streaming validator in ``tunekit.data`` checks the same rules by hand, because building a
pydantic model per row is too slow for million-row files; ``tests/test_rows_convert.py`` keeps the
two in agreement.

    prompt/response   {"prompt": "...", "response": "..."}      ("completion" is accepted for "response")
    chat              {"messages": [{"role": ..., "content": ..., "weight"?: 0|1}, ...], "tools"?: [...]}
    preference        {"input": {"messages": [...]}, "preferred_output": [<assistant msg>],
                       "non_preferred_output": [<assistant msg>]}
"""

from __future__ import annotations

import enum
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RowKind(str, enum.Enum):
    PROMPT_RESPONSE = "prompt_response"
    CHAT = "chat"
    PREFERENCE = "preference"

    def __str__(self) -> str:
        return self.value


Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptResponseRow(_Row):
    """One prompt and the response to learn. ``completion`` is the same field under another name."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["response"]}, {"required": ["completion"]}]},
    )

    prompt: str = Field(..., min_length=1, description="The input text.")
    response: Optional[str] = Field(None, min_length=1, description="The text to learn (or use 'completion').")
    completion: Optional[str] = Field(None, min_length=1, description="Alias of 'response'; give one, not both.")

    @model_validator(mode="after")
    def _one_answer(self) -> "PromptResponseRow":
        if (self.response is None) == (self.completion is None):
            raise ValueError("give exactly one of 'response' or 'completion'")
        return self

    @property
    def answer(self) -> str:
        return self.response if self.response is not None else self.completion  # type: ignore[return-value]


class Message(_Row):
    """One chat message. ``content`` may be omitted only on an assistant message that has ``tool_calls``."""

    role: Role
    content: Optional[str] = Field(None, description="Message text (non-empty).")
    weight: Optional[Literal[0, 1]] = Field(
        None, description="Assistant messages only: 0 = shown as context but not trained on, 1 = trained on."
    )
    name: Optional[str] = Field(None, min_length=1, description="Optional speaker name.")
    tool_calls: Optional[list[dict[str, Any]]] = Field(
        None, min_length=1, description="Assistant messages only: the tool calls it makes (OpenAI format)."
    )
    tool_call_id: Optional[str] = Field(None, min_length=1, description="Tool messages only: the call answered.")

    @model_validator(mode="after")
    def _check(self) -> "Message":
        if self.content is None or not self.content.strip():
            if not (self.role == "assistant" and self.tool_calls):
                raise ValueError(f"{self.role} message needs non-empty 'content'")
        if self.weight is not None and self.role != "assistant":
            raise ValueError("'weight' is only allowed on assistant messages")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("'tool_calls' is only allowed on assistant messages")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("'tool_call_id' is only allowed on tool messages")
        return self


class ChatRow(_Row):
    """A conversation; assistant turns (weight 1, the default) are what the model learns."""

    messages: list[Message] = Field(..., min_length=1)
    tools: Optional[list[dict[str, Any]]] = Field(None, description="Tool definitions (OpenAI format), optional.")


class PreferenceInput(_Row):
    messages: list[Message] = Field(..., min_length=1, description="The conversation, ending with a user turn.")
    tools: Optional[list[dict[str, Any]]] = None


class PreferenceRow(_Row):
    """A prompt conversation with a preferred and a non-preferred assistant reply (DPO)."""

    input: PreferenceInput
    preferred_output: list[Message] = Field(..., min_length=1, max_length=1)
    non_preferred_output: list[Message] = Field(..., min_length=1, max_length=1)


ROW_MODELS: dict[RowKind, type[BaseModel]] = {
    RowKind.PROMPT_RESPONSE: PromptResponseRow,
    RowKind.CHAT: ChatRow,
    RowKind.PREFERENCE: PreferenceRow,
}

__all__ = [
    "ROLES",
    "ROW_MODELS",
    "ChatRow",
    "Message",
    "PreferenceInput",
    "PreferenceRow",
    "PromptResponseRow",
    "Role",
    "RowKind",
]
