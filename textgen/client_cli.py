"""``textgen generate``, ``textgen score``, ``textgen session`` and ``textgen models``: talk to a running server
through ``textgen.client``. Text streams to stdout as it arrives; summaries go to stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from textgen.flags import add_control_flags, add_sampling_flags


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--server",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="server (default: %(default)s); replicas as HOST:PORT,HOST:PORT (IP addresses) or dns:///NAME:PORT, "
        "balanced call by call (round_robin)",
    )
    g.add_argument("--tls", action="store_true", help="connect with TLS")
    g.add_argument("--ca", type=Path, help="CA certificate to trust (PEM; default: the system's); implies --tls")
    g.add_argument("--cert", type=Path, help="client certificate for mutual TLS (PEM); implies --tls")
    g.add_argument("--key", type=Path, help="client private key for mutual TLS (PEM)")
    g.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline per call in seconds (generate --failover: for the whole generation; default: none)",
    )


def _client(args: argparse.Namespace) -> Any:
    from textgen.client import Client, channel_credentials

    creds = channel_credentials(args.ca, args.cert, args.key) if (args.tls or args.ca or args.cert) else None
    return Client(args.server, creds, args.timeout, failover=getattr(args, "failover", False))


def register(commands: Any) -> None:
    p = commands.add_parser(
        "generate",
        help="generate text on a running server, streamed as it is sampled",
        description="Stream a continuation from a textgen server. A summary (finish reason, token counts, seed, "
        "timings) goes to stderr. --session continues a server-side session; --snapshot-out/--snapshot-in carry "
        "the whole state in a file instead, so any replica with the same model and key can continue it.",
    )
    add_sampling_flags(p, max_tokens=None)
    p.add_argument("--model", default="", help="model name (default: the server's only model)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")
    p.add_argument("--session", default="", metavar="ID", help="continue this session (textgen session create)")
    p.add_argument("--snapshot-in", type=Path, metavar="FILE", help="resume from a snapshot file")
    p.add_argument(
        "--snapshot-out",
        type=Path,
        metavar="FILE",
        help="write the state after this call to FILE (with --n, candidate i's to FILE.i)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=0,
        metavar="N",
        help="N candidates of the prompt (its state is computed once), each printed after a '--- candidate I' line "
        "once all are done, each with its own summary; candidate I is the text --seed SEED_I (its summary's seed) "
        "gives alone (default: 1)",
    )
    p.add_argument(
        "--num-beams",
        type=int,
        default=0,
        metavar="N",
        help="beam search with N beams (deterministic: no --temperature, --top-k, --top-p, --min-p or --seed); "
        "prints the --n best beams, best first, when the search ends (default: 0, sampling)",
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        help="beam search: a beam's score is its log-probability / tokens ^ LENGTH_PENALTY; above 0 favours "
        "longer texts (-10..10, default: 1)",
    )
    p.add_argument(
        "--early-stopping",
        action="store_true",
        help="beam search: stop once --num-beams beams have finished (default: while a running beam can still win)",
    )
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability to stderr")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    add_control_flags(p)
    g = p.add_argument_group("constrained decoding")
    g.add_argument("--regex", default="", metavar="PATTERN", help="the generated text must match PATTERN (Rust regex)")
    g.add_argument(
        "--choice", action="append", default=[], metavar="TEXT", help="the generated text must be one TEXT (repeatable)"
    )
    p.add_argument(
        "--failover",
        action="store_true",
        help="if the replica generating fails, continue on another one with exactly the same text (fixes a random "
        "seed when none is given; not for --session)",
    )
    _connection_flags(p)
    p.set_defaults(handler=_generate)

    p = commands.add_parser("score", help="log-probabilities and perplexity of a text under a served model")
    p.add_argument("text", nargs="?", help="text to score (default: read stdin)")
    p.add_argument("--file", type=Path, help="score this file's text")
    p.add_argument("--model", default="", help="model name (default: the server's only model)")
    p.add_argument("--tokens", action="store_true", help="also print every token's log-probability")
    _connection_flags(p)
    p.set_defaults(handler=_score)

    p = commands.add_parser("session", help="create, fork or close a server-side session")
    p.add_argument("action", choices=("create", "fork", "close"), help="what to do")
    p.add_argument("session_id", nargs="?", default="", help="session to fork or close")
    p.add_argument("--model", default="", help="model for a new session (default: the server's only model)")
    p.add_argument("--seed", type=int, default=None, help="seed of the session's generator (default: random)")
    p.add_argument("--snapshot-in", type=Path, metavar="FILE", help="create the session from a snapshot file")
    _connection_flags(p)
    p.set_defaults(handler=_session)

    p = commands.add_parser("models", help="list the models a server serves, with their manifest facts")
    _connection_flags(p)
    p.set_defaults(handler=_models)


def _generate(args: argparse.Namespace) -> int:
    if args.n < 0:
        from textgen.errors import InvalidInputError

        raise InvalidInputError(f"--n: {args.n} is negative")
    options = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "logprobs": args.logprobs,
        "session_id": args.session,
        "snapshot": args.snapshot_in.read_bytes() if args.snapshot_in else None,
        "return_snapshot": args.snapshot_out is not None,
        "min_p": args.min_p,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "logit_bias": dict(args.logit_bias),
        "logit_bias_text": dict(args.logit_bias_text),
        "allowed_token_ids": args.allow_token,
        "banned_token_ids": args.ban_token,
        "stop_token_ids": args.stop_token,
        "top_logprobs": args.top_logprobs,
        "n": args.n,
        "regex": args.regex,
        "choices": args.choice,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "early_stopping": args.early_stopping,
    }
    if args.num_beams > 1:  # a beam search samples nothing: the sampling defaults are not sent (others are refused)
        options["temperature"] = None if args.temperature == 1.0 else args.temperature
        options["top_p"] = None if args.top_p == 1.0 else args.top_p
    start = time.perf_counter()
    with _client(args) as client:
        candidates = _candidates(client, args, options) if args.n > 1 else [_streamed(client, args, options)]
    seconds = time.perf_counter() - start
    for c in candidates:
        if args.snapshot_out:
            out = args.snapshot_out
            if args.n > 1:
                out = out.with_name(f"{out.name}.{c.index}")
            tmp = out.with_name(out.name + ".partial")
            tmp.write_bytes(c.complete.snapshot)
            tmp.replace(out)
        if not args.quiet:
            print(_summary(c.complete, seconds, f"candidate {c.index}: " if args.n > 1 else ""), file=sys.stderr)
    return 0


def _print_logprobs(logprobs: Any) -> None:
    for lp in logprobs:
        alternatives = "".join(f"\t{a.token!r} {a.logprob:.4f}" for a in lp.top_logprobs)
        print(f"{lp.token!r}\t{lp.logprob:.4f}{alternatives}", file=sys.stderr)


def _streamed(client: Any, args: argparse.Namespace, options: dict[str, Any]) -> Any:
    """One continuation, printed as it arrives; returned as a Candidate (its text not kept)."""
    from textgen.v1 import textgen_pb2 as pb

    done = pb.Candidate()
    sys.stdout.write(args.prompt)
    for msg in client.stream(args.prompt, **options):
        sys.stdout.write(msg.text)
        sys.stdout.flush()
        _print_logprobs(msg.logprobs)
        if msg.HasField("complete"):
            done.complete.CopyFrom(msg.complete)
    sys.stdout.write("\n")
    return done


def _candidates(client: Any, args: argparse.Namespace, options: dict[str, Any]) -> list[Any]:
    """Several candidates, each printed whole under its header once all are done (their log-probabilities to
    stderr under the same header)."""
    from textgen.client import gather

    candidates = gather(client.stream(args.prompt, **options))
    for c in candidates:
        sys.stdout.write(f"--- candidate {c.index}\n{args.prompt}{c.text}\n")
        if c.logprobs:
            print(f"--- candidate {c.index}", file=sys.stderr)
            _print_logprobs(c.logprobs)
    sys.stdout.flush()
    return candidates


def _summary(complete: Any, seconds: float, label: str = "") -> str:
    from textgen.v1 import textgen_pb2 as pb

    reason = pb.FinishReason.Name(complete.finish_reason).removeprefix("FINISH_REASON_").lower()
    return (
        f"[{label}{reason}; {complete.prompt_tokens} prompt + {complete.generated_tokens} generated tokens in "
        f"{seconds:.2f} s ({complete.generated_tokens / max(seconds, 1e-9):.0f} tokens/s); first token "
        f"{complete.timings.first_token_seconds * 1000:.1f} ms; "
        + ("" if complete.HasField("beam_score") else f"seed {complete.seed}; ")  # a beam search samples nothing
        + f"{complete.model}:{complete.model_version}"
        + (f"; stop token {complete.stop_token_id}" if complete.HasField("stop_token_id") else "")
        + (f"; beam score {complete.beam_score:.4f}" if complete.HasField("beam_score") else "")
        + (f"; session {complete.session_id}" if complete.session_id else "")
        + "]"
    )


def _score(args: argparse.Namespace) -> int:
    from textgen.errors import InvalidInputError

    if args.file is not None:
        text = args.file.read_text(encoding="utf-8")
    elif args.text is not None:
        text = args.text
    else:
        text = sys.stdin.read()
    if not text:
        raise InvalidInputError("nothing to score: give TEXT, --file or text on stdin")
    with _client(args) as client:
        reply = client.score(text, args.model, token_logprobs=args.tokens)
    for t in reply.tokens:
        print(f"{t.token!r}\t{t.logprob:.4f}")
    bpc = f", {reply.bits_per_char:.4f} bits/char" if reply.bits_per_char else ""
    print(
        f"{reply.token_count} tokens: loss {reply.loss:.4f} nats/token, perplexity {reply.perplexity:.2f}{bpc} "
        f"({reply.model}:{reply.model_version})"
    )
    return 0


def _session(args: argparse.Namespace) -> int:
    from textgen.errors import InvalidInputError

    with _client(args) as client:
        if args.action == "create":
            snapshot = args.snapshot_in.read_bytes() if args.snapshot_in else b""
            info = client.create_session(args.model, args.seed, snapshot)
        elif not args.session_id:
            raise InvalidInputError(f"session {args.action}: give the SESSION_ID")
        elif args.action == "fork":
            info = client.fork_session(args.session_id, args.seed)
        else:
            client.close_session(args.session_id)
            print(f"closed {args.session_id}")
            return 0
    print(info.session_id)
    print(
        f"model {info.model}:{info.model_version}, {info.token_count} tokens, {info.state_bytes} bytes, "
        f"expires after {info.idle_ttl_seconds:.0f} s idle",
        file=sys.stderr,
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        models = client.list_models()
    for m in models:
        info = MessageToDict(m, preserving_proto_field_name=True)
        info.pop("manifest_json", None)
        print(json.dumps(info, indent=1))
    return 0
