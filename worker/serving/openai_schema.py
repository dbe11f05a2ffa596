"""OpenAI's request bodies and responses, and their translation to and from IceCache's.

A body becomes a ``pb.GenerateRequest`` (``to_generate``), so the HTTP API is checked and
served exactly as a gRPC call; a ``pb.GenerateDone`` and the streamed tokens become OpenAI's
objects (``completion``, ``chunk``). Defaults are OpenAI's: ``temperature`` 1, ``top_p`` 1,
``max_tokens`` 16 for completions and the rest of the context for chat.

Fields that would change what comes back and that IceCache does not implement (``n`` > 1,
``logprobs``, ``tools``, penalties, ...) are refused with a 400 naming them, never ignored;
fields that only label a request (``user``, ``metadata``, ...) are accepted and ignored;
unknown fields are refused, as OpenAI does. IceCache's own extras, sent in the body (the
``openai`` client's ``extra_body``): ``policy``, ``budget``, ``top_k``, ``stop_token_ids``,
``ignore_eos``, ``reuse_prefix``. ``usage.prompt_tokens_details.cached_tokens`` counts the
prompt tokens taken from blocks the cache service kept (prefix reuse), as OpenAI's does.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from proto.icecache.v1 import worker_pb2 as pb
from worker.sampling import SamplingParams

COMPLETIONS_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of ``/v1/completions``."""


class RequestError(ValueError):
    """A body IceCache cannot serve as asked: answered 400 (or ``status``), naming ``param``."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


OPENAI_SAMPLING = {"temperature": 1.0}
"""Where OpenAI's default differs from ``SamplingParams``' (which is greedy)."""
ALL_TOKENS_TOP_K = -1
"""``top_k`` that keeps every token, as vLLM spells it (IceCache's own is 0)."""

if TYPE_CHECKING:
    _SamplingFields = BaseModel
else:  # an optional body field per parameter, by its name and type
    _SamplingFields = create_model(
        "_SamplingFields",
        **{
            f.name: (typing.get_type_hints(SamplingParams)[f.name] | None, None)
            for f in dataclasses.fields(SamplingParams)
        },
    )


class _Body(_SamplingFields):
    """What both endpoints share; the sampling fields are ``SamplingParams``' (OpenAI names
    ``temperature``, ``top_p`` and ``seed`` the same; ``top_k`` is IceCache's own)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # IceCache's own
    policy: str | None = None
    budget: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    reuse_prefix: bool | None = None

    def unsupported(self) -> list[str]:
        """The fields set to something IceCache would have to ignore to serve the body."""
        off = [
            name
            for name, value in (
                ("n", self.n not in (None, 1)),
                ("presence_penalty", self.presence_penalty not in (None, 0)),
                ("frequency_penalty", self.frequency_penalty not in (None, 0)),
                ("logit_bias", bool(self.logit_bias)),
            )
            if value
        ]
        return off

    def sampling(self) -> dict[str, Any]:
        """The ``GenerateRequest`` fields of sampling, stopping and the sequence's policy."""
        fields: dict[str, Any] = {
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
            "stop_token_ids": list(self.stop_token_ids or ()),
            "ignore_eos": bool(self.ignore_eos),
            **OPENAI_SAMPLING,
        }
        for name in (*SamplingParams.names(), "policy", "budget", "reuse_prefix"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if fields.get("top_k") == ALL_TOKENS_TOP_K:
            del fields["top_k"]
        return fields

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class CompletionBody(_Body):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported(self) -> list[str]:
        off = super().unsupported()
        off += [n for n in ("echo", "suffix") if getattr(self, n)]
        off += ["best_of"] if self.best_of not in (None, 1) else []
        off += ["logprobs"] if self.logprobs is not None else []
        return off

    def prompt_input(self) -> str | list[int]:
        """The one prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise RequestError(
                    f"`prompt` holds {len(p)} prompts; send one prompt per request "
                    "(several in one call are not supported)",
                    "prompt",
                )
            p = p[0]
        return p  # type: ignore[return-value]


class ChatMessage(BaseModel):
    """One turn; fields other than these (``name``, ``refusal``, ...) are accepted."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None

    def turn(self, index: int) -> dict[str, str]:
        """``{"role", "content"}`` for the chat template."""
        where = f"messages[{index}]"
        if self.role in ("tool", "function") or self.tool_calls:
            raise RequestError(f"{where}: tool calls are not supported", "messages")
        role = "system" if self.role == "developer" else self.role
        if self.content is None or isinstance(self.content, str):
            return {"role": role, "content": self.content or ""}
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                    f"supported, got type {part.get('type')!r}",
                    "messages",
                )
            texts.append(part["text"])
        return {"role": role, "content": "".join(texts)}


IGNORED_CHAT_FIELDS = (
    "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "safety_identifier", "moderation",
    "verbosity",
)  # fmt: skip
"""Fields that label a chat request or tune what IceCache does not have: accepted, ignored."""


class ChatBody(_Body):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None
    moderation: Any = None
    verbosity: Any = None

    def unsupported(self) -> list[str]:
        off = super().unsupported()
        off += [
            n
            for n in ("logprobs", "tools", "functions", "function_call", "audio", "prediction")
            if getattr(self, n)
        ]
        off += ["top_logprobs"] if self.top_logprobs is not None else []
        off += ["tool_choice"] if self.tool_choice not in (None, "none") else []
        off += ["reasoning_effort"] if self.reasoning_effort is not None else []
        off += ["web_search_options"] if self.web_search_options is not None else []
        if self.response_format and self.response_format.get("type") != "text":
            off.append("response_format")
        if self.modalities and self.modalities != ["text"]:
            off.append("modalities")
        return off

    def turns(self) -> list[dict[str, str]]:
        return [m.turn(i) for i, m in enumerate(self.messages)]

    @property
    def wanted_tokens(self) -> int | None:
        """``max_completion_tokens``, else the older ``max_tokens``; ``None``: not given."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )


_Body.model_rebuild()
CompletionBody.model_rebuild()
ChatBody.model_rebuild()


def refuse_unsupported(body: _Body) -> None:
    """``RequestError`` naming every field IceCache would have to ignore."""
    off = body.unsupported()
    if off:
        names = ", ".join(f"`{n}`" for n in off)
        raise RequestError(
            f"IceCache does not support {names} as sent (one greedy or sampled choice of text, "
            "without log-probabilities, tools or penalties); leave them out",
            off[0],
        )


def to_generate(
    body: _Body, prompt: str | list[int], max_new_tokens: int, request_id: str
) -> pb.GenerateRequest:
    """The ``GenerateRequest`` that serves ``body`` (prompt already rendered)."""
    if isinstance(prompt, str):
        request = pb.GenerateRequest(prompt=prompt, chat=False)
    else:
        request = pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=prompt))
    request.max_new_tokens = max_new_tokens
    request.request_id = request_id
    for name, value in body.sampling().items():
        try:
            if isinstance(value, list):
                getattr(request, name).extend(value)
            else:
                setattr(request, name, value)
        except (ValueError, TypeError) as err:  # out of the field's range
            raise RequestError(f"`{name}` cannot be {value!r}: {err}", name) from None
    return request


@dataclass(frozen=True)
class Reply:
    """How a call's objects are labelled; ``chat``: chat completion objects, else text ones."""

    id: str
    model: str
    chat: bool
    created: int = 0

    @classmethod
    def new(cls, id: str, model: str, chat: bool) -> Reply:
        return cls(id, model, chat, int(time.time()))

    def _head(self, suffix: str = "") -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + suffix,
            "created": self.created,
            "model": self.model,
        }

    def completion(self, done: pb.GenerateDone) -> dict[str, Any]:
        """The whole answer."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"] = done.text
        choice["finish_reason"] = done.stats.finish_reason
        body = self._head() | {"choices": [choice], "usage": usage(done)}
        return body | {"icecache": details(done)}

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        """One streamed piece of text (and, with ``finish_reason``, the last)."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.chat:
            choice["delta"] = {"content": text} if text or finish_reason is None else {}
        else:
            choice["text"] = text
        choice["finish_reason"] = finish_reason
        return self._head(".chunk" if self.chat else "") | {"choices": [choice]}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role; text streams with nothing."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self._head(".chunk") | {"choices": [choice | {"finish_reason": None}]}

    def last_chunk(self, done: pb.GenerateDone) -> dict[str, Any]:
        """The text held back for stop strings, the finish reason and IceCache's details."""
        out = self.chunk(done.held_text, done.stats.finish_reason)
        return out | {"icecache": details(done)}

    def usage_chunk(self, done: pb.GenerateDone) -> dict[str, Any]:
        """``stream_options.include_usage``: no choices, the usage."""
        return self._head(".chunk" if self.chat else "") | {"choices": [], "usage": usage(done)}


def usage(done: pb.GenerateDone) -> dict[str, Any]:
    prompt, output = done.usage.prompt_tokens, done.usage.output_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": done.stats.reused_tokens},
    }


def details(done: pb.GenerateDone) -> dict[str, Any]:
    """IceCache's own account of the call: the ``GenerateStats`` and the sampling seed."""
    out: dict[str, Any] = {field.name: value for field, value in done.stats.ListFields()}
    if done.HasField("seed"):
        out["seed"] = done.seed
    return out


def error_body(message: str, status: int, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
