"""The monitoring configuration under deploy/, checked with the real tools: promtool checks both Prometheus
configs and unit-tests the alert rules; the Grafana dashboard is well formed; and Debian's Prometheus, started on
loopback, scrapes a real textgen server under load while every dashboard panel's query (Grafana variables
substituted) is run against it: each must parse and return data."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import promql_parser
import pytest
import yaml

from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, Live

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "textgen.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval is with the test's 1 s scrape interval (at least 4 scrapes)
# The panels with one line per replica (the others show totals over every replica).
PER_REPLICA = (
    "Requests/s by replica",
    "Tokens/s by replica",
    "Streams and queue by replica",
    "HTTP requests/s by replica",
)
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an environment's proxy
QUERY_TIMEOUT = 120.0  # seconds the live test may wait for Prometheus and for every query's data (a loaded machine)

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (scripts/install-system-deps.sh installs it)"
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus not installed (scripts/install-system-deps.sh installs it)"
)


def promtool(*args: str) -> None:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- static checks --------------------------------------------------------------------------------------------


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.ci.yml"])
def test_prometheus_config_is_valid(config: str) -> None:
    promtool("check", "config", str(PROMETHEUS_DIR / config))


@needs_promtool
def test_alert_rules_pass_their_unit_tests() -> None:
    promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    promtool("test", "rules", str(PROMETHEUS_DIR / "alerts.test.yml"))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(model: str = ".*") -> Iterator[tuple[str, str]]:
    """(panel title, query) for every panel target, with Grafana's variables substituted as Grafana would."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            expr = expr.replace("${model}", model).replace("$model", model)
            yield panel["title"], expr


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["model"]["includeAll"] and variables["model"]["allValue"] == ".*"
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
    queries = list(panel_queries())
    for title, expr in queries:
        promql_parser.parse(expr)  # raises on a syntax error
        assert "$" not in expr, f"{title}: unsubstituted variable in {expr}"
    # every per-model metric is filtered by the model variable; session metrics, the HTTP API's (labelled by
    # endpoint, not model) and scrape health (`up`) are server-wide on purpose
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if "session" not in expr and "textgen_http_" not in expr and not expr.startswith(("sum(up{", "count(up{")):
                assert '{model=~"$model"}' in target["expr"].replace(", ", ","), (panel["title"], target["expr"])
    titles = {p["title"] for p in panels}
    for wanted in ("Tokens/s", "Requests/s", "Errors/s by reason", "Time to first token", "Inter-token latency",
                   "Queue and batch", "Queue wait", "Batch size per step", "Step time by phase", "Sessions",
                   "Session state memory", *PER_REPLICA, "Replicas up", "HTTP requests/s",
                   "HTTP request duration"):  # fmt: skip
        assert wanted in titles
    # a line per replica: by instance, the label every scrape has (compose, CI and Kubernetes alike)
    for panel in panels:
        if panel["title"] in PER_REPLICA:
            assert all(t["expr"].startswith("sum by (instance) (") for t in panel["targets"]), panel["title"]


# -- live: Prometheus scraping a real server under load -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Debian's Prometheus on a loopback port, scraping one target every second."""

    def __init__(self, root: Path, target: str) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "textgen", "static_configs": [{"targets": [target]}]}],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.target = target
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = (root / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read().decode()
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited; see its log"
            with contextlib.suppress(OSError):
                self.get("/-/ready")
                return
            time.sleep(0.2)
        raise AssertionError("prometheus never became ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Load:
    """A bounded mixed load on threads: streams, unary calls, scoring, sessions, cancels and bad requests (so the
    error panels have data). Runs until ``stop``, and stops by itself after ``limit`` seconds at the latest, a bound
    well past the test's own waits (``QUERY_TIMEOUT``), so data keeps coming for as long as the test waits for it."""

    def __init__(self, live: Live, workers: int = 4, limit: float = 300.0) -> None:
        self.live = live
        self.stop_at = time.monotonic() + limit
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    def _work(self, worker: int) -> None:
        live, stub = self.live, self.live.stub
        for i in itertools.count():
            if self._stop.is_set() or time.monotonic() > self.stop_at:
                return
            try:
                kind = (worker + i) % 7
                if kind == 6:  # the HTTP API, unary and streamed (the HTTP panels)
                    self._http(i)
                elif kind == 0:
                    live.generate("the ", max_tokens=30, seed=i)
                elif kind == 1:
                    call = live.stream("to be ", max_tokens=1000)
                    next(call)
                    call.cancel()
                elif kind == 2:
                    with contextlib.suppress(grpc.RpcError):
                        live.generate("x", temperature=math.nan)
                elif kind == 3:
                    stub.Score(pb.ScoreRequest(text="a stitch in time saves nine"), timeout=CALL_TIMEOUT)
                elif kind == 4:
                    session = stub.CreateSession(pb.CreateSessionRequest(seed=i), timeout=CALL_TIMEOUT)
                    try:
                        live.generate("def ", max_tokens=10, session_id=session.session_id)
                        if i % 2:
                            stub.CloseSession(
                                pb.CloseSessionRequest(session_id=session.session_id), timeout=CALL_TIMEOUT
                            )
                    except grpc.RpcError as exc:
                        # the table holds 8: a worker held up long enough finds its new session evicted by the
                        # others' (a documented outcome, not an error), however unlikely on an idle machine
                        if exc.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                else:
                    list(live.stream("a ", max_tokens=60, seed=i))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    self.errors.append(exc)

    def _http(self, i: int) -> None:
        assert self.live.server.server is not None and self.live.server.server.http is not None
        body = {"prompt": "the ", "max_tokens": 20, "seed": i, "stream": bool(i % 2)}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.live.server.server.http.port}/v1/completions",
            json.dumps(body).encode(),
            {"content-type": "application/json"},
        )
        try:
            with _LOOPBACK.open(request, timeout=CALL_TIMEOUT) as reply:
                ending = reply.read().rstrip()[-6:]
        except OSError as exc:  # an HTTP error status too (HTTPError)
            self.errors.append(exc)
            return
        if not ending.endswith(b"[DONE]" if body["stream"] else b"}"):  # a stream's last event, a whole JSON reply
            self.errors.append(AssertionError(f"HTTP reply ends with {ending!r}"))

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(CALL_TIMEOUT)


@pytest.fixture
def scraped(serve: Callable[..., Live], tmp_path: Path) -> Iterator[tuple[Prometheus, Load]]:
    live = serve(
        metrics_port=0, http_port=0, max_tokens_limit=1000, max_sessions=8
    )  # a small table: evictions happen too
    assert live.server.server is not None and live.server.server.metrics_port
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{live.server.server.metrics_port}")
    load = Load(live)
    try:
        prometheus.wait_ready(QUERY_TIMEOUT)
        yield prometheus, load
    finally:
        load.stop()
        prometheus.stop()
    assert not load.errors, load.errors[:3]


@needs_prometheus
def test_every_dashboard_query_returns_data_from_a_live_server(scraped: tuple[Prometheus, Load]) -> None:
    prometheus, _ = scraped
    # Polled until each query has data (a rate needs two scrapes in its window, a quantile an observation in it),
    # with one generous overall bound, instead of sleeping for what a fast machine needs.
    deadline = time.monotonic() + QUERY_TIMEOUT
    while True:
        up = prometheus.query('up{job="textgen"}')
        if up and up[0]["value"][1] == "1":
            break
        assert time.monotonic() < deadline, "prometheus never scraped the server"
        time.sleep(0.5)
    missing = {expr: title for title, expr in panel_queries()}
    last: dict[str, Any] = {}
    while missing and time.monotonic() < deadline:
        for expr in list(missing):
            last[expr] = prometheus.query(expr)
            if any(math.isfinite(float(r["value"][1])) for r in last[expr]):
                del missing[expr]
        if missing:
            time.sleep(1)
    assert not missing, "\n".join(f"{title}: {last[expr]}" for expr, title in missing.items())
    # the per-replica panels have one line per scraped server, named by its address
    for title, expr in panel_queries():
        if title in PER_REPLICA:
            assert {r["metric"].get("instance") for r in last[expr]} == {prometheus.target}, (title, last[expr])
    # and the model variable's own query (label_values) has the served model
    models = prometheus.get("/api/v1/label/model/values", **{"match[]": "textgen_model_info"})["data"]
    assert models == ["tiny"]
