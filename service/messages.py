"""Conversions between ``textgen.v1`` messages and the app's domain types, for the gRPC servicer (and any other
transport that speaks the same messages). Nothing here decides anything: validation is the app's."""

from __future__ import annotations

from service.app import GenerateSpec, Outcome
from service.models import ServedModel
from service.resume import ResumeSpec
from service.sequence import Delta, Finish
from textgen.v1 import textgen_pb2 as pb

_FINISH = {
    Finish.LENGTH: pb.FINISH_REASON_LENGTH,
    Finish.STOP: pb.FINISH_REASON_STOP,
    Finish.CANCELLED: pb.FINISH_REASON_CANCELLED,
    Finish.SLOW_READER: pb.FINISH_REASON_SLOW_READER,
}


def spec_of(r: pb.GenerateRequest, principal: str = "") -> GenerateSpec:
    return GenerateSpec(
        model=r.model,
        prompt=r.prompt,
        max_tokens=r.max_tokens,
        temperature=r.temperature if r.HasField("temperature") else None,
        top_k=r.top_k,
        top_p=r.top_p if r.HasField("top_p") else None,
        repetition_penalty=r.repetition_penalty if r.HasField("repetition_penalty") else None,
        seed=r.seed if r.HasField("seed") else None,
        stop=list(r.stop),
        logprobs=r.logprobs,
        session_id=r.session_id,
        snapshot=r.snapshot,
        return_snapshot=r.return_snapshot,
        return_token_ids=r.return_token_ids,
        resume=(
            ResumeSpec(r.resume.token_ids, r.resume.text_chars, r.resume.model_version)
            if r.HasField("resume")
            else None
        ),
        min_p=r.min_p if r.HasField("min_p") else None,
        presence_penalty=r.presence_penalty if r.HasField("presence_penalty") else None,
        frequency_penalty=r.frequency_penalty if r.HasField("frequency_penalty") else None,
        logit_bias=r.logit_bias,  # the messages' own maps and lists: nothing is copied before it is checked
        logit_bias_text=r.logit_bias_text,
        allowed_token_ids=r.allowed_token_ids,
        banned_token_ids=r.banned_token_ids,
        stop_token_ids=r.stop_token_ids,
        top_logprobs=r.top_logprobs,
        n=r.n,
        num_beams=r.num_beams,
        length_penalty=r.length_penalty if r.HasField("length_penalty") else None,
        early_stopping=r.early_stopping,
        regex=r.regex,
        choices=r.choices,
        principal=principal,
    )


def logprobs_of(deltas: list[Delta]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=t.token_id,
            token=t.token,
            logprob=t.logprob,
            top_logprobs=[pb.TopLogprob(token_id=a.token_id, token=a.token, logprob=a.logprob) for a in t.top],
        )
        for d in deltas
        for t in d.logprobs
    ]


def completion_of(model: ServedModel, outcome: Outcome) -> pb.Completion:
    r = outcome.result
    return pb.Completion(
        finish_reason=_FINISH.get(r.finish, pb.FINISH_REASON_UNSPECIFIED) if r.finish else pb.FINISH_REASON_UNSPECIFIED,
        prompt_tokens=r.prompt_tokens,
        generated_tokens=r.generated_tokens,
        seed=r.seed,
        model=model.name,
        model_version=model.version,
        timings=pb.Timings(
            queue_seconds=r.queue_seconds,
            prompt_seconds=r.prompt_seconds,
            first_token_seconds=r.first_token_seconds,
            total_seconds=r.total_seconds,
        ),
        stop=r.stop,
        stop_token_id=r.stop_token if r.stop_token >= 0 else None,
        snapshot=outcome.snapshot,
        session_id=outcome.session_id,
        index=outcome.index,
        cumulative_logprob=r.cumulative_logprob,
        beam_score=r.beam_score,
    )


def model_info(model: ServedModel, unknown_policy_text: dict[str, str]) -> pb.ModelInfo:
    m = model.bundle.manifest
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        cell=m.model.cell,
        num_layers=m.model.num_layers,
        hidden_size=m.model.hidden_size,
        vocab_size=m.model.vocab_size,
        level=m.tokenizer.level,
        precision=m.graph.precision,
        execution_providers=model.bundle.providers,
        state_bytes=model.state_bytes,
        val_loss=m.provenance.val_loss or 0.0,
        training_data=m.provenance.data,
        training_steps=m.provenance.steps,
        unknown_token_policy=unknown_policy_text[model.unknown_policy],
        manifest_json=m.model_dump_json(),
    )


UNKNOWN_POLICY = {
    "map": "characters or words outside the vocabulary become <unk>",
    "reject": "characters or words outside the vocabulary are rejected with INVALID_ARGUMENT",
}
