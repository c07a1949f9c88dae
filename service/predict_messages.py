"""Conversions between Predict's ``textgen.v1`` messages and ``service.predict``'s types (kept apart from
``service.messages``, whose conversions are Generate's)."""

from __future__ import annotations

from service.predict import Predicted, PredictSpec
from textgen.errors import InvalidInputError
from textgen.v1 import textgen_pb2 as pb

_UNITS = {pb.PREDICT_UNIT_UNSPECIFIED: "", pb.PREDICT_UNIT_TOKEN: "token", pb.PREDICT_UNIT_WORD: "word"}


def predict_spec_of(r: pb.PredictRequest, principal: str = "") -> PredictSpec:
    if r.unit not in _UNITS:  # an open enum: any number arrives
        raise InvalidInputError(f"unit: unknown value {r.unit} (PREDICT_UNIT_TOKEN or PREDICT_UNIT_WORD)")
    return PredictSpec(
        model=r.model,
        text=r.text,
        session_id=r.session_id,
        snapshot=r.snapshot,
        num_predictions=r.num_predictions,
        unit=_UNITS[r.unit],
        return_snapshot=r.return_snapshot,
        max_word_chars=r.max_word_chars,
        principal=principal,
    )


def predict_reply(done: Predicted) -> pb.PredictResponse:
    return pb.PredictResponse(
        predictions=[pb.Prediction(text=p.text, token_ids=p.token_ids, logprob=p.logprob) for p in done.predictions],
        snapshot=done.snapshot,
        model=done.model.name,
        model_version=done.model.version,
        context_tokens=done.context_tokens,
    )
