"""A candidate's new output as GenerateStream messages: one, or several where one would be over the server's
max_message_bytes, which gRPC would refuse to send (RESOURCE_EXHAUSTED, the call lost). A beam search sends a whole
beam at once: 600 tokens with 20 alternatives each are about 200 KB. The text, log-probabilities and token ids are
cut between deltas; ``model_version`` rides on the first message, ``complete`` on the last."""

from __future__ import annotations

from collections.abc import Iterator

from service.messages import logprobs_of
from service.sequence import Delta
from textgen.v1 import textgen_pb2 as pb

# Bytes a group of deltas may need beyond the sum of their one-delta messages' sizes: the group message's own tags
# and length prefixes (index, text, model_version, complete), which those sizes count only in part.
_MARGIN = 64


def stream_messages(
    request: pb.GenerateRequest,
    index: int,
    deltas: list[Delta],
    version: str,
    complete: pb.Completion | None,
    limit: int,
) -> list[pb.GenerateStreamResponse]:
    """Candidate ``index``'s ``deltas`` as stream messages of at most ``limit`` bytes each where they can be (one
    delta is never cut), the first with ``version`` (if any), the last with ``complete`` (if any)."""
    whole = _message(request, index, deltas, version, complete)
    if len(deltas) <= 1 or whole.ByteSize() <= limit:  # the common case: one message, sized once
        return [whole]
    extra = len(version) + (complete.ByteSize() if complete is not None else 0) + _MARGIN
    groups = list(_groups(request, deltas, limit - extra))
    return [
        _message(request, index, group, version if i == 0 else "", complete if i == len(groups) - 1 else None)
        for i, group in enumerate(groups)
    ]


def _message(
    request: pb.GenerateRequest, index: int, deltas: list[Delta], version: str, complete: pb.Completion | None
) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(text="".join(d.text for d in deltas), index=index, model_version=version)
    if request.logprobs or request.top_logprobs:  # top_logprobs implies logprobs
        msg.logprobs.extend(logprobs_of(deltas))
    if request.return_token_ids:
        msg.token_ids.extend(d.token for d in deltas if d.token >= 0)  # (-1: text with no token)
    if complete is not None:
        msg.complete.CopyFrom(complete)
    return msg


def _groups(request: pb.GenerateRequest, deltas: list[Delta], room: int) -> Iterator[list[Delta]]:
    """Consecutive runs of ``deltas`` whose one-delta messages add up to at most ``room`` bytes (at least one
    delta each)."""
    group: list[Delta] = []
    size = 0
    for delta in deltas:
        own = _message(request, 0, [delta], "", None).ByteSize()
        if group and size + own > room:
            yield group
            group, size = [], 0
        group.append(delta)
        size += own
    if group:
        yield group
