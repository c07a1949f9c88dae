"""``textgen bench soak``: one real ``textgen serve`` under minutes of mixed load from a few client threads (streams,
unary calls, scores, sessions, forks, snapshots, cancels, short deadlines, bad requests), its RSS, threads, fds, CPU
time and /metrics gauges sampled every few seconds. It answers what a short benchmark cannot: does memory or a thread
or fd count creep, does any call end in INTERNAL, and do slots, queue and sessions return to zero afterwards."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench.serve import ServerProcess, export_bundles, machine
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc

FAILING = ("INTERNAL", "UNKNOWN")  # a server bug (or a crash the transport saw), never a client's fault
MAX_PROMPT_TOKENS = 4096  # set on the server, low, so the over-long prompt is a small message (the limit is cheap)
LONG = 4000  # tokens asked by calls that are cancelled or time out: long enough to be cut mid-generation
CALL_TIMEOUT = 120.0  # every call has a deadline, so a wedged server ends the run instead of hanging it
GAUGES = {"textgen_running_sequences": "running", "textgen_paused_sequences": "paused",
          "textgen_queue_size": "queue", "textgen_sessions_active": "sessions"}  # fmt: skip
EXPECTED = {"INVALID_ARGUMENT", "NOT_FOUND"}  # what a bad request should get
ROUTINE = {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}  # answers to well-formed calls; others are kept with their message


class SoakServer(ServerProcess):
    """``ServerProcess`` (its start-up, port discovery and SIGTERM stop) with /metrics on a free port, a session
    TTL and a low prompt limit; the log is kept to report the server's errors."""

    def __init__(self, bundle: Path, threads: int, session_ttl: float) -> None:
        cmd = [sys.executable, "-m", "textgen.cli", "serve", "--bundle", str(bundle), "--port", "0",
               "--metrics-port", "0", "--providers", "CPUExecutionProvider", "--intra-op-threads", str(threads),
               "--session-ttl-seconds", str(session_ttl), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
               "--log-level", "info"]  # fmt: skip
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stderr=self.log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = self._port()
        self.log.seek(0)
        self.metrics_port = int(self.log.read().split("metrics on http://127.0.0.1:")[1].split("/")[0])


def scrape(port: int) -> dict[str, Any]:
    """The gauges (summed over models; None when absent, e.g. a server without paused streams), requests by
    method and code, tokens sampled and sessions ended, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, Any] = dict.fromkeys(GAUGES.values())
    requests: dict[str, Counter[str]] = defaultdict(Counter)
    ended: Counter[str] = Counter()
    tokens = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in GAUGES:
                out[GAUGES[s.name]] = (out[GAUGES[s.name]] or 0) + s.value
            elif s.name == "textgen_requests_total":
                requests[s.labels["method"]][s.labels["code"]] += int(s.value)
            elif s.name == "textgen_generated_tokens_total":
                tokens += s.value
            elif s.name == "textgen_sessions_ended_total":
                ended[s.labels["reason"]] += int(s.value)
    return {**out, "requests": {m: dict(c) for m, c in requests.items()}, "tokens": int(tokens), "ended": ended}


class Tally:
    """What every client thread saw, under one lock: answers by method and status, bad requests by kind, tokens,
    the sessions still open, and a pool of generated texts reused as in-vocabulary prompts."""

    def __init__(self) -> None:
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.requests: dict[str, Counter[str]] = defaultdict(Counter)
        self.bad: dict[str, Counter[str]] = defaultdict(Counter)
        self.tokens = 0
        self.surprises: dict[str, list[str]] = defaultdict(list)  # "method CODE": the first messages
        self.open_sessions: set[str] = set()
        self.texts: list[str] = []

    def count(self, method: str, code: str, tokens: int = 0, bad: str = "", details: str = "") -> None:
        with self.lock:
            if not bad and code not in ROUTINE and len(self.surprises[f"{method} {code}"]) < 5:
                self.surprises[f"{method} {code}"].append(details[:300])
            self.requests[method][code] += 1
            self.tokens += tokens
            if bad:
                self.bad[bad][code] += 1

    def learn(self, text: str) -> None:
        with self.lock:  # the last 64 non-blank texts
            self.texts = [*self.texts[-63:], text[:300]] if text.strip() else self.texts


class Client:
    """One load thread: a channel of its own and rounds over every kind of work until told to stop (checked
    between rounds, so even a short run does every kind at least once)."""

    def __init__(self, target: str, tally: Tally, seed: int) -> None:
        self.channel = grpc.insecure_channel(target, [("grpc.use_local_subchannel_pool", 1)])  # a connection each
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.tally, self.rng = tally, random.Random(seed)

    def run(self) -> None:
        work = [self.stream, self.plain, self.score, self.session, self.snapshot, self.cancel, self.deadline,
                self.bad_requests]  # fmt: skip
        try:
            while not self.tally.stop.is_set():
                self.rng.shuffle(work)
                for op in work:
                    op()
        finally:
            self.channel.close()

    def call(self, method: str, fn: Callable[[], Any], bad: str = "") -> tuple[str, Any]:
        """Run one call, count its status (and tokens, from a ``complete``); the reply, or None on an error."""
        try:
            reply, code, details = fn(), "OK", ""
        except grpc.RpcError as exc:  # a grpc.Call
            reply, code, details = None, exc.code().name, exc.details() or ""  # type: ignore[attr-defined]
        tokens = getattr(getattr(reply, "complete", None), "generated_tokens", 0)
        self.tally.count(method, code, tokens, bad, details)
        return code, reply

    def unary(self, method: str, request: Any, timeout: float = 60, bad: str = "") -> Any:
        """A unary call by method name; the reply, or None on an error."""
        return self.call(method, lambda: getattr(self.stub, method)(request, timeout=timeout), bad)[1]

    def prompt(self, chars: int = 80) -> str:
        """A piece of text the model generated earlier: in its vocabulary, whatever the model."""
        with self.tally.lock:
            text = self.rng.choice(self.tally.texts) if self.tally.texts else ""
        start = self.rng.randrange(max(1, len(text) - chars))
        return text[start : start + self.rng.randint(0, chars)]

    def request(self, max_tokens: int, **fields: Any) -> pb.GenerateRequest:
        fields.setdefault("prompt", self.prompt())
        fields.setdefault("temperature", self.rng.choice([0.0, 0.7, 1.0]))
        return pb.GenerateRequest(max_tokens=max_tokens, seed=self.rng.randrange(2**32), **fields)

    def generate(self, request: pb.GenerateRequest, timeout: float = CALL_TIMEOUT, bad: str = "") -> Any:
        reply = self.unary("Generate", request, timeout, bad)
        if reply is not None:
            self.tally.learn(reply.text)
        return reply

    def read_stream(self, request: pb.GenerateRequest, cancel_after: int = 0, timeout: float = CALL_TIMEOUT) -> None:
        """A stream read to its end, or cancelled by the client after ``cancel_after`` messages."""

        def run() -> Any:
            call, last, text = self.stub.GenerateStream(request, timeout=timeout), None, []
            for i, msg in enumerate(call):
                text.append(msg.text)
                last = msg
                if cancel_after and i + 1 == cancel_after and not msg.HasField("complete"):
                    call.cancel()  # the next read raises CANCELLED
            self.tally.learn("".join(text))
            return last

        self.call("GenerateStream", run)

    def open(self, method: str, request: Any) -> str:
        """A new session (created or forked); its id is tracked until closed, '' on an error."""
        info = self.unary(method, request)
        if info is None:
            return ""
        with self.tally.lock:
            self.tally.open_sessions.add(info.session_id)
        return str(info.session_id)

    def close(self, session_id: str) -> None:
        request = pb.CloseSessionRequest(session_id=session_id)
        if self.call("CloseSession", lambda: self.stub.CloseSession(request, timeout=60))[0] in (
            "OK",
            "NOT_FOUND",
        ):  # NOT_FOUND: it expired meanwhile
            with self.tally.lock:
                self.tally.open_sessions.discard(session_id)

    def stream(self) -> None:
        self.read_stream(self.request(self.rng.randint(16, 256), top_k=self.rng.choice([0, 10])))

    def plain(self) -> None:
        stop = self.prompt(3) if self.rng.random() < 0.5 else ""
        self.generate(self.request(self.rng.randint(8, 128), stop=[stop] if stop else [], logprobs=True, top_p=0.9))

    def score(self) -> None:
        self.unary("Score", pb.ScoreRequest(text=self.prompt(400) or "a", token_logprobs=True))

    def session(self) -> None:
        sid = self.open("CreateSession", pb.CreateSessionRequest(seed=self.rng.randrange(2**32)))
        if not sid:
            return
        self.generate(self.request(self.rng.randint(8, 64), session_id=sid))
        fork = self.open("ForkSession", pb.ForkSessionRequest(session_id=sid))
        if fork:
            self.read_stream(self.request(self.rng.randint(8, 64), session_id=fork))
            if self.rng.random() < 0.7:  # else left idle, for the TTL to expire (or the end to close)
                self.close(fork)
        self.close(sid)

    def snapshot(self) -> None:
        reply = self.generate(self.request(self.rng.randint(8, 64), return_snapshot=True))
        if reply is None:
            return
        self.generate(self.request(self.rng.randint(8, 64), snapshot=(snap := reply.complete.snapshot)))
        sid = self.open("CreateSession", pb.CreateSessionRequest(snapshot=snap))
        if sid:
            self.generate(self.request(self.rng.randint(8, 32), session_id=sid))
            self.close(sid)

    def cancel(self) -> None:
        self.read_stream(self.request(LONG), cancel_after=self.rng.randint(1, 4))

    def deadline(self) -> None:
        timeout = self.rng.uniform(0.05, 0.5)  # expires during a LONG generation
        if self.rng.random() < 0.5:
            self.generate(self.request(LONG), timeout=timeout)
        else:
            self.read_stream(self.request(LONG), timeout=timeout)

    def bad_requests(self) -> None:
        """One of each bad request; each should get INVALID_ARGUMENT or NOT_FOUND, never INTERNAL."""
        garbage = self.rng.randbytes(self.rng.randint(1, 200))
        long = ((self.prompt(300) or "a") * 10 * MAX_PROMPT_TOKENS)[: 10 * MAX_PROMPT_TOKENS]  # tokens, chars or words
        fields = {"temperature<0": {"temperature": -1.0}, "top_p>1": {"top_p": 1.5}, "17 stops": {"stop": ["x"] * 17},
                  "max_tokens>limit": {"max_tokens": 10**7}, "unknown model": {"model": "no-such-model"},
                  "unknown session": {"session_id": "no-such-session"}, "garbage snapshot": {"snapshot": garbage},
                  "over-long prompt": {"prompt": long}}  # fmt: skip
        for kind, bad in fields.items():
            self.generate(pb.GenerateRequest(**{"max_tokens": 8, **bad}), 60, bad=f"Generate {kind}")
        for kind, request in {
            "Score unknown model": pb.ScoreRequest(model="no-such-model", text="a"),
            "Score over-long text": pb.ScoreRequest(text=long),
            "ForkSession unknown session": pb.ForkSessionRequest(session_id="no-such-session"),
            "CloseSession unknown session": pb.CloseSessionRequest(session_id="no-such-session"),
            "CreateSession garbage snapshot": pb.CreateSessionRequest(snapshot=garbage),
        }.items():
            self.unary(kind.split()[0], request, bad=kind)


def sample(proc: psutil.Process, metrics_port: int, t0: float) -> dict[str, Any]:
    """One look at the server: its process (RSS, threads, fds, CPU time) and its gauges."""
    row: dict[str, Any] = {"t": round(time.monotonic() - t0, 2)}
    try:
        with proc.oneshot():
            cpu = proc.cpu_times()
            row.update(rss_mib=proc.memory_info().rss / 2**20, threads=proc.num_threads(), fds=proc.num_fds(),
                       cpu_s=cpu.user + cpu.system)  # fmt: skip
        metrics = scrape(metrics_port)
        row.update({k: metrics[k] for k in GAUGES.values()})
    except (psutil.Error, OSError) as exc:  # the server died or stopped answering: the report says so
        row["error"] = repr(exc)
    return row


def _wait_for(check: Callable[[], bool], seconds: float) -> float | None:
    """Poll ``check`` until true (the seconds it took) or ``seconds`` pass (None)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            if check():
                return round(time.monotonic() - start, 2)
        except OSError:
            pass
        time.sleep(0.2)
    return None


def _span(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in rows if key in r]
    return {"start": values[0], "end": values[-1], "max": max(values)} if values else {}


def run_soak(bundle: Path | None, checkpoint: Path | None, out_dir: Path, seconds: float, clients: int,
             threads: int = 0, session_ttl: float = 60.0, sample_every: float = 5.0) -> dict[str, Any]:  # fmt: skip
    """The whole soak: soak.json, soak.png, server.log in ``out_dir``; the report's ``failures`` is [] if it passed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if bundle is None:
        assert checkpoint is not None
        bundle = export_bundles(checkpoint, out_dir / "bundles", ["fp32"])["fp32"]
    server = SoakServer(bundle, threads, session_ttl)
    tally, samples, failures = Tally(), list[dict[str, Any]](), list[str]()
    try:
        proc = psutil.Process(server.proc.pid)
        target = f"127.0.0.1:{server.port}"
        helper = Client(target, tally, -1)  # warms the server up, seeds the texts, closes what the load left open
        helper.generate(pb.GenerateRequest(max_tokens=256, seed=0))
        t0 = time.monotonic()
        samples.append(sample(proc, server.metrics_port, t0))
        workers = [threading.Thread(target=Client(target, tally, i).run, daemon=True) for i in range(clients)]
        for w in workers:
            w.start()
        while time.monotonic() - t0 < seconds and server.proc.poll() is None:
            time.sleep(min(sample_every, max(0.0, seconds - (time.monotonic() - t0))))
            samples.append(sample(proc, server.metrics_port, t0))
        load_seconds = time.monotonic() - t0
        if died := sum(not w.is_alive() for w in workers):  # a bug in this program, not the server's
            failures.append(f"{died} client thread(s) died before the end (traceback on stderr)")
        tally.stop.set()  # each client ends its round; every call has a deadline, so this is bounded
        for w in workers:
            w.join(timeout=4 * CALL_TIMEOUT)
        if any(w.is_alive() for w in workers):
            failures.append("client threads still running 8 minutes after the load stopped")
        busy = ("running", "queue", "paused")  # paused: None on a server without it
        drain_seconds = _wait_for(lambda: not any(scrape(server.metrics_port)[k] for k in busy), 60)
        leftover = sorted(tally.open_sessions)  # the client threads have ended
        for sid in leftover:  # the ones the load left idle (or whose close failed), unless the TTL took them
            helper.close(sid)
        helper.channel.close()
        sessions_seconds = _wait_for(lambda: scrape(server.metrics_port)["sessions"] == 0, 15)
        samples.append(sample(proc, server.metrics_port, t0))
        final = scrape(server.metrics_port) if server.proc.poll() is None else None
    finally:
        alive = server.proc.poll() is None
        server.log.seek(0)  # the server's log, kept for its errors and tracebacks
        (out_dir / "server.log").write_text(server.log.read())
        server.log.seek(0)
        errors = [ln.rstrip() for ln in server.log if " ERROR " in ln or " CRITICAL " in ln]  # tracebacks: server.log
        server.stop()
    for failed, why in (
        (not alive, f"the server died (exit status {server.proc.returncode})"),
        (drain_seconds is None, f"running/paused/queue gauges not back to zero 60 s after the load: {samples[-1]}"),
        (sessions_seconds is None, f"textgen_sessions_active not back to zero after closing sessions: {samples[-1]}"),
    ):
        failures += [why] if failed else []
    ended = dict((final or {}).get("ended", {}))  # sessions closed, expired, evicted
    internal = sum(c[code] for c in tally.requests.values() for code in FAILING)
    server_internal = sum(c.get(code, 0) for c in (final or {}).get("requests", {}).values() for code in FAILING)
    if internal or server_internal:
        failures.append(f"{internal} INTERNAL/UNKNOWN answers seen by clients, {server_internal} counted by the server")
    rows = [r for r in samples if "rss_mib" in r]
    half = [r for r in rows if load_seconds / 2 <= r["t"] <= load_seconds + 1e-6]  # after warm-up, under load
    slope = (
        float(np.polyfit([r["t"] / 60 for r in half], [r["rss_mib"] for r in half], 1)[0]) if len(half) > 2 else None
    )
    report: dict[str, Any] = {
        "command": " ".join(["textgen", *sys.argv[1:]]) if sys.argv[0].endswith("textgen") else "",
        "machine": machine(),
        "bundle": str(bundle),
        "clients": clients,
        "load_seconds": round(load_seconds, 1),
        "session_ttl_seconds": session_ttl,
        "passed": not failures,
        "failures": failures,
        "internal": internal,
        "server_internal": server_internal,
        "requests": {m: dict(sorted(c.items())) for m, c in sorted(tally.requests.items())},
        "server_requests": (final or {}).get("requests"),
        "bad_requests": {k: dict(v) for k, v in sorted(tally.bad.items())},
        "bad_requests_unexpected": {k: dict(v) for k, v in sorted(tally.bad.items()) if set(v) - EXPECTED},
        "tokens_generated": tally.tokens,  # completed calls' generated_tokens, as clients saw them
        "server_tokens_generated": (final or {}).get("tokens"),  # every token sampled, cancelled calls' included
        "rss_mib": {**_span(rows, "rss_mib"), "slope_mib_per_min_second_half": slope},
        **{key: _span(rows, key) for key in ("threads", "fds")},
        "server_cpu_seconds": rows[-1]["cpu_s"] - rows[0]["cpu_s"] if rows else None,
        "drain_seconds": drain_seconds,
        "sessions": {"closed_at_end": len(leftover), "zero_after_seconds": sessions_seconds, "ended": ended},
        "gauges_end": {k: samples[-1].get(k) for k in GAUGES.values()},
        "surprises": dict(tally.surprises),  # e.g. a session that expired between two calls of one op
        "server_errors": {"count": len(errors), "first": errors[:10]},
        "samples": samples,
    }
    (out_dir / "soak.json").write_text(json.dumps(report, indent=1))
    plot_soak(report, out_dir / "soak.png")
    return report


def plot_soak(report: dict[str, Any], path: Path) -> Path:
    """RSS, threads and fds, and the batch/session gauges over the run; the dashed line is where the load stopped."""
    from bench.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    panels = {"server RSS (MiB)": ["rss_mib"], "threads, open fds": ["threads", "fds"],
              "sequences": ["running", "paused", "queue"], "open sessions": ["sessions"]}  # fmt: skip
    for ax, (title, keys) in zip(axes.flat, panels.items(), strict=True):
        for key in keys:
            points = [(r["t"] / 60, r[key]) for r in report["samples"] if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), ".-", label=key)
        ax.axvline(report["load_seconds"] / 60, color="k", linestyle="--", alpha=0.5)
        ax.set(title=title, xlabel="minutes" if ax in axes[1] else "")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"textgen soak: {report['clients']} clients, {report['load_seconds'] / 60:.1f} min")
    return _save(plt, fig, path)
