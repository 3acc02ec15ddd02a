"""OpenAI request and response shapes: parse and check a request body, build the replies.

`parse_request` turns a `/v1/completions` or `/v1/chat/completions` body into a `GenRequest`
(prompt ids, the engine's `SampleConfig`, seed, stop strings) or raises `RequestError` with the
HTTP status and a message naming the field. Everything is checked here, before a request reaches
the batcher, so a bad request costs no model time and cannot fail a batch it would have joined.

Beyond OpenAI's fields a request may set the engine's `steps`, `block_length`, `threshold` and
`cache`, and `stream_denoise: true` to receive every denoising step (positions revealed, with
their tokens) in the stream.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from difflm.data.conversations import Dialogue, prompt_ids
from difflm.errors import DifflmError
from difflm.sampling.settings import CACHE_MODES
from difflm.sampling.unmask import SampleConfig
from difflm.serve.models import ServedModel

CHAT_ROLES = {"user": "human", "assistant": "gpt"}
MAX_STOPS = 4


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the offending field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


@dataclass
class Defaults:
    """Server-wide defaults for fields a request leaves out."""

    max_tokens: int = 64
    block_length: int | None = 32


@dataclass
class GenRequest:
    model: ServedModel
    prompt_ids: list[int]
    cfg: SampleConfig
    seed: int
    stop: tuple[str, ...]
    stream: bool
    stream_denoise: bool
    chat: bool

    def batch_key(self) -> tuple[str, str]:
        """Requests with equal keys may share one engine batch (only prompt and seed differ)."""
        return self.model.name, repr(self.cfg)


def _field(body: dict, name: str, types: tuple[type, ...], default: Any = None, what: str = "") -> Any:
    """body[name] checked against `types` (bool is never taken for a number)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise RequestError(400, f"'{name}' must be {what or ' or '.join(t.__name__ for t in types)}", name)
    return value


def pick_model(body: dict, models: dict[str, ServedModel]) -> ServedModel:
    name = _field(body, "model", (str,), what="a string")
    if name is None:
        if len(models) == 1:
            return next(iter(models.values()))
        raise RequestError(400, f"'model' is required: one of {', '.join(models)}", "model")
    if name not in models:
        raise RequestError(
            404,
            f"model '{name}' is not served; GET /v1/models lists {', '.join(models)}",
            "model",
            "model_not_found",
        )
    return models[name]


def _prompt_ids(body: dict, served: ServedModel, chat: bool) -> list[int]:
    tok = served.tokenizer
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(
                400, "'prompt' is required and must be a string (or a list of one string)", "prompt"
            )
        return tok.encode(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    system, turns = None, []
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", *CHAT_ROLES)
        ):
            raise RequestError(
                400, "each message needs 'role' (system, user, assistant) and string 'content'", "messages"
            )
        if m["role"] == "system":
            system = m["content"]
        else:
            turns.append((CHAT_ROLES[m["role"]], m["content"]))
    return prompt_ids(tok, Dialogue(system, tuple(turns), ""))


def _max_tokens(body: dict, served: ServedModel, n_prompt: int, defaults: Defaults) -> int:
    room = served.max_length - n_prompt
    if room < 1:
        raise RequestError(
            400,
            f"prompt of {n_prompt} tokens leaves no room in the model's {served.max_length}; shorten it",
            "prompt",
        )
    given = _field(body, "max_tokens", (int,), what="an integer")
    given = _field(body, "max_completion_tokens", (int,), given, "an integer")
    if given is None:
        return min(defaults.max_tokens, room)
    if given < 1 or given > room:
        raise RequestError(
            400,
            f"max_tokens={given} must be in [1, {room}]: the model holds {served.max_length} tokens and the prompt {n_prompt}",
            "max_tokens",
        )
    return given


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise RequestError(
            400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop"
        )
    return tuple(stops)


def _sample_config(body: dict, served: ServedModel, max_tokens: int, defaults: Defaults) -> SampleConfig:
    number = (int, float)
    block = _field(body, "block_length", (int,), what="an integer")
    if block is None and defaults.block_length is not None:
        block = min(defaults.block_length, max_tokens)
    cache = _field(body, "cache", (str,), "none", "a string")
    if cache not in CACHE_MODES:
        raise RequestError(400, f"'cache' must be one of {', '.join(CACHE_MODES)}", "cache")
    eos = served.tokenizer.eos_token_id if served.ends_with_eos else None
    try:
        return SampleConfig(
            gen_length=max_tokens,
            steps=_field(body, "steps", (int,), max_tokens, "an integer"),
            block_length=None if served.autoregressive else block,
            threshold=_field(body, "threshold", number, what="a number"),
            cache="none" if served.autoregressive else cache,
            temperature=float(_field(body, "temperature", number, 0.0, "a number")),
            top_p=_field(body, "top_p", number, what="a number"),
            eos_token_id=eos,
            eos_mode="fill" if eos is not None else "none",
            suppress_tokens=served.suppressed(),
        )
    except DifflmError as err:
        raise RequestError(400, str(err).replace("sample.", "")) from None


def parse_request(body: Any, models: dict[str, ServedModel], chat: bool, defaults: Defaults) -> GenRequest:
    """Check a completions (chat=False) or chat completions body; raise RequestError when bad."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    served = pick_model(body, models)
    if _field(body, "n", (int,), 1, "an integer") != 1:
        raise RequestError(400, "only n=1 is supported; send one request per sample", "n")
    try:
        ids = _prompt_ids(body, served, chat)
    except DifflmError as err:
        raise RequestError(400, str(err), "messages" if chat else "prompt") from None
    if served.autoregressive and not ids:
        raise RequestError(400, "an autoregressive model needs a non-empty prompt", "prompt")
    max_tokens = _max_tokens(body, served, len(ids), defaults)
    seed = _field(body, "seed", (int,), None, "an integer")
    return GenRequest(
        model=served,
        prompt_ids=ids,
        cfg=_sample_config(body, served, max_tokens, defaults),
        seed=secrets.randbits(63) if seed is None else seed,
        stop=_stop(body),
        stream=bool(_field(body, "stream", (bool,), False, "a boolean")),
        stream_denoise=bool(_field(body, "stream_denoise", (bool,), False, "a boolean")),
        chat=chat,
    )


# ----------------------------------------------------------------------------- replies


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def reply(req: GenRequest, rid: str, text: str, finish: str, completion_tokens: int) -> dict:
    """The whole (non-streamed) response."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": req.model.name,
        "system_fingerprint": f"seed-{req.seed}",
        "choices": [choice],
        "usage": {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(req.prompt_ids) + completion_tokens,
        },
    }


def chunk(
    req: GenRequest, rid: str, text: str | None, finish: str | None, denoise: dict | None = None
) -> dict:
    """One server-sent event: a text delta, the finish reason, or (extension) a denoising step."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if req.chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    if denoise is not None:
        choice["denoise"] = denoise
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": req.model.name,
        "choices": [choice],
    }
