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
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

T = TypeVar("T")
# An optional key that must not be null when present: the JSON Schema shows only the value type.
Omittable = Union[T, SkipJsonSchema[None]]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _optional(**kwargs: Any) -> Any:
    return Field(None, json_schema_extra=_no_default, **kwargs)


class RowKind(str, enum.Enum):
    PROMPT_RESPONSE = "prompt_response"
    CHAT = "chat"
    PREFERENCE = "preference"

    def __str__(self) -> str:
        return self.value


Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


NonEmpty = Annotated[str, Field(min_length=1)]
Objects = Annotated[list[dict[str, Any]], Field(min_length=1)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        # An optional key is omitted, never null (only a message's content may be null, beside tool_calls).
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None and key != "content":
                    raise ValueError(f"{key!r} must not be null: omit the key instead")
        return data


class PromptResponseRow(_Row):
    """One prompt and the response to learn. ``completion`` is the same field under another name."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": ["response"]}, {"required": ["completion"]}]},
    )

    prompt: str = Field(..., min_length=1, description="The input text.")
    response: Omittable[NonEmpty] = _optional(description="The text to learn (or use 'completion').")
    completion: Omittable[NonEmpty] = _optional(description="Alias of 'response'; give one, not both.")

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
    content: Optional[str] = _optional(description="Message text (non-empty; null only beside 'tool_calls').")
    weight: Omittable[Literal[0, 1]] = _optional(
        description="Assistant messages only: 0 = shown as context but not trained on, 1 = trained on."
    )
    name: Omittable[NonEmpty] = _optional(description="Optional speaker name.")
    tool_calls: Omittable[Objects] = _optional(
        description="Assistant messages only: the tool calls it makes (OpenAI format)."
    )
    tool_call_id: Omittable[NonEmpty] = _optional(description="Tool messages only: the call answered.")

    @field_validator("weight", mode="before")
    @classmethod
    def _int_weight(cls, value: Any) -> Any:
        if type(value) is not int:  # Literal[0, 1] alone would take true/false and 1.0
            raise ValueError("'weight' must be the integer 0 or 1")
        return value

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
    tools: Omittable[list[dict[str, Any]]] = _optional(description="Tool definitions (OpenAI format), optional.")


class PreferenceInput(_Row):
    messages: list[Message] = Field(..., min_length=1, description="The conversation, ending with a user turn.")
    tools: Omittable[list[dict[str, Any]]] = _optional(description="Tool definitions (OpenAI format), optional.")


class PreferenceRow(_Row):
    """A prompt conversation with a preferred and a non-preferred assistant reply (DPO)."""

    input: PreferenceInput
    preferred_output: list[Message] = Field(..., min_length=1, max_length=1)
    non_preferred_output: list[Message] = Field(..., min_length=1, max_length=1)

    @model_validator(mode="after")
    def _check(self) -> "PreferenceRow":
        for where, msgs in (("input.messages", self.input.messages), ("preferred_output", self.preferred_output),
                            ("non_preferred_output", self.non_preferred_output)):
            if any(m.weight is not None for m in msgs):
                raise ValueError(f"{where}: 'weight' has no meaning in a preference row")
        for where, msgs in (("preferred_output", self.preferred_output),
                            ("non_preferred_output", self.non_preferred_output)):
            if msgs[0].role != "assistant":
                raise ValueError(f"{where} must hold an assistant message")
        return self


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
