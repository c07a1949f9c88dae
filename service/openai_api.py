"""OpenAI's completions API <-> the app's domain types, for the HTTP transport (service/http_api.py): a request body
as a ``GenerateSpec``, a generation's output as OpenAI's response and stream chunk shapes. Nothing here decides
anything about generation: validation is the app's, as for gRPC (service/messages.py).

textgen's own request fields are accepted beside OpenAI's, at the top level of the body (the openai client's
``extra_body``, as vLLM does); textgen's own reply fields are under the ``textgen`` key of the response (and of
each choice)."""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.app import GenerateSpec
from service.generation import Outcome
from service.sequence import Delta
from textgen.errors import InvalidInputError

# A token id, as the proto's uint32 (JSON's integers are unbounded: 2**70 must be refused naming its field, not
# overflow a numpy conversion).
TokenId = Annotated[int, Field(ge=0, le=2**32 - 1)]


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. Unknown fields are refused (a misspelt extension must not be ignored)."""

    # NaN and infinities (which Python's json reads) are no numbers a field takes: refused naming the field
    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    model: str = ""
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(None, ge=0)  # unset: the server's default_max_tokens
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0)  # OpenAI's legacy form: how many top tokens each position reports
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # {"include_usage": true}: a last chunk with the usage
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    user: str = ""  # accepted and ignored, as an OpenAI client may send it
    echo: bool = False  # refused when true: not available
    best_of: int | None = None  # refused unless equal to n
    suffix: str | None = None  # refused: not available
    # -- textgen's own fields (extensions) -------------------------------------------------------------------
    top_k: int = Field(0, ge=0)
    min_p: float | None = None
    repetition_penalty: float | None = None
    session_id: str = ""
    snapshot: str = ""  # base64 of a snapshot a previous reply returned
    return_snapshot: bool = False
    regex: str = ""
    choices: list[str] = []
    num_beams: int = Field(0, ge=0)
    length_penalty: float | None = None
    early_stopping: bool = False
    stop_token_ids: list[TokenId] = []
    allowed_token_ids: list[TokenId] = []
    banned_token_ids: list[TokenId] = []
    logit_bias_text: dict[str, float] = {}
    timeout: float | None = Field(None, gt=0)  # seconds: the call's deadline (gRPC's), 504 when it passes


class FieldError(InvalidInputError):
    """A request field OpenAI's schema refuses (of the wrong type, or one this API does not know)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.param = field


def parse_request(body: Any) -> CompletionRequest:
    """The request body as a ``CompletionRequest``; a bad field is an ``InvalidInputError`` naming it."""
    if not isinstance(body, dict):
        raise InvalidInputError("request: the body must be a JSON object")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "request"
        raise FieldError(field, err["msg"]) from None


def _prompt(request: CompletionRequest) -> str:
    if isinstance(request.prompt, str):
        return request.prompt
    if len(request.prompt) > 1:
        raise InvalidInputError("prompt: one prompt per request (a list of one string at most); send one each")
    return request.prompt[0] if request.prompt else ""


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidInputError(
                f"logit_bias: key {key[:40]!r} is not a token id (biases by text go in logit_bias_text)"
            ) from None
    return out


def _snapshot(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("snapshot: not base64") from None


def spec_of(request: CompletionRequest, principal: str = "") -> GenerateSpec:
    if request.echo:
        raise InvalidInputError("echo: not available (the reply holds the completion only)")
    if request.suffix:
        raise InvalidInputError("suffix: not available (the models continue text, they do not fill it in)")
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidInputError("best_of: not available (ask for n candidates and choose among them)")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return GenerateSpec(
        model=request.model,
        prompt=_prompt(request),
        max_tokens=request.max_tokens or 0,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=stop,
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs or 0,
        session_id=request.session_id,
        snapshot=_snapshot(request.snapshot) if request.snapshot else b"",
        return_snapshot=request.return_snapshot,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=_logit_bias(request.logit_bias),
        logit_bias_text=request.logit_bias_text,
        allowed_token_ids=request.allowed_token_ids,
        banned_token_ids=request.banned_token_ids,
        stop_token_ids=request.stop_token_ids,
        n=request.n if request.n > 1 else 0,
        num_beams=request.num_beams,
        length_penalty=request.length_penalty,
        early_stopping=request.early_stopping,
        regex=request.regex,
        choices=request.choices,
        principal=principal,
    )


# The domain's field names where OpenAI's differ (an error names the field the caller sent).
_PARAM = {"top_logprobs": "logprobs", "session": "session_id"}  # ("session 'x' does not exist ...")
_FIELD = re.compile(r"^([a-z_]+)(?:\[[^\]]*\])?[: ]")


def param_of(exc: Exception) -> str | None:
    """The request field an error message names (domain messages start with it: "n: ...", "top_p must ..."), if
    any."""
    if isinstance(exc, FieldError):
        return exc.param
    match = _FIELD.match(str(exc))
    if match is None or match.group(1) not in CompletionRequest.model_fields | _PARAM:
        return None
    return _PARAM.get(match.group(1), match.group(1))


class Logprobs:
    """One choice's ``logprobs`` object, gathered as it comes (OpenAI's legacy shape; text_offset counts characters
    of the completion, from 0)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []
        self.offset = 0

    def add(self, deltas: list[Delta]) -> dict[str, Any]:
        """Take ``deltas``; returns the object for just these (a stream chunk's)."""
        start = len(self.tokens)
        for delta in deltas:
            for t in delta.logprobs:
                self.tokens.append(t.token)
                self.token_logprobs.append(t.logprob)
                self.top_logprobs.append({a.token: a.logprob for a in t.top})
                self.text_offset.append(self.offset)
            self.offset += len(delta.text)
        return self.since(start)

    def since(self, start: int = 0) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


def finish_reason(outcome: Outcome) -> str:
    """OpenAI's "length" or "stop"; textgen's own where a generation ended otherwise ("cancelled": the server shut
    down under it)."""
    finish = outcome.result.finish
    return finish.value if finish is not None else "stop"


def choice_extension(outcome: Outcome) -> dict[str, Any]:
    """textgen's own fields of a finished choice (``choices[i].textgen``)."""
    r = outcome.result
    out: dict[str, Any] = {"seed": r.seed, "stop": r.stop}
    if r.stop_token >= 0:
        out["stop_token_id"] = r.stop_token
    if r.cumulative_logprob is not None:
        out["cumulative_logprob"] = r.cumulative_logprob
    if r.beam_score is not None:
        out["beam_score"] = r.beam_score
    if outcome.snapshot:
        out["snapshot"] = base64.b64encode(outcome.snapshot).decode()
    if outcome.session_id:
        out["session_id"] = outcome.session_id
    return out


def usage(outcomes: list[Outcome]) -> dict[str, int]:
    prompt = outcomes[0].result.prompt_tokens if outcomes else 0
    completion = sum(o.result.generated_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(model: str, version: str) -> dict[str, Any]:
    """The fields every response and chunk of one completion shares."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "textgen": {"model_version": version},
    }
