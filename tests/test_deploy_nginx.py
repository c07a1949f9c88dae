"""The nginx in front of the replicas, checked without running the stack: it balances over exactly the replicas
compose runs and Prometheus scrapes, its configs pass `nginx -t`, it never resends a gRPC call or a completion that
reached a replica, and it proxies the HTTP API unbuffered with the principal header set and the body limit of the
replicas. (Split from tests/test_deploy.py, whose fixtures and helpers it uses.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import BASE, CI, DEPLOY, REPLICAS, _on_host, _render, ci_models  # noqa: F401 (a fixture)


def _nginx_config(nginx: dict[str, Any]) -> Path:
    (config,) = [arg for arg in nginx["command"] if arg.startswith("/etc/nginx/textgen/")]
    return _on_host(config, "/etc/nginx/textgen/", DEPLOY / "nginx")


@pytest.mark.parametrize("files", [[BASE], [BASE, CI]], ids=["base", "ci"])
def test_nginx_and_prometheus_reach_every_replica(ci_models: Path, files: list[str]) -> None:  # noqa: F811
    """The replicas compose runs are the ones nginx balances over and Prometheus scrapes, each labelled with its
    name: adding a replica means three edits, and this catches a forgotten one."""
    services = _render(ci_models, files)["services"]

    def address(name: str, setting: str, default: int) -> str:
        # CI: the host network, each replica on its own port; compose: the service name and the image's port
        if services[name].get("network_mode") == "host":
            return f"127.0.0.1:{services[name]['environment'][setting]}"
        return f"{name}:{services[name]['environment'].get(setting, default)}"

    nginx_config = _nginx_config(services["nginx"]).read_text(encoding="utf-8")
    for upstream_name, setting, default in (
        ("textgen", "TEXTGEN_PORT", 50051),
        ("textgen_http", "TEXTGEN_HTTP_PORT", 8000),
    ):
        (upstream,) = re.findall(rf"upstream {upstream_name} \{{(.*?)\}}", nginx_config, flags=re.DOTALL)
        servers = re.findall(r"^\s*server\s+([^\s;]+)", upstream, flags=re.MULTILINE)
        assert servers == [address(name, setting, default) for name in REPLICAS], upstream_name
    (flag,) = [a for a in services["prometheus"]["command"] if a.startswith("--config.file=")]
    scrape = yaml.safe_load(_on_host(flag.split("=", 1)[1], "/etc/prometheus/", DEPLOY / "prometheus").read_text())
    (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "textgen"]
    targets = {target: group["labels"]["replica"] for group in job["static_configs"] for target in group["targets"]}
    assert targets == {address(name, "TEXTGEN_METRICS_PORT", 9400): name for name in REPLICAS}


@pytest.mark.parametrize("config", ["nginx.conf", "nginx.ci.conf"])
def test_nginx_config_passes_nginx_t(tmp_path: Path, config: str) -> None:
    """Debian's nginx (the one the image installs) accepts each config. The compose one names replicas that
    resolve only inside the compose network, so its copy here names loopback instead."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).is_file():
        pytest.skip("nginx is not installed (scripts/install-system-deps.sh installs it)")
    conf = tmp_path / "conf"
    shutil.copytree(DEPLOY / "nginx", conf)
    text = (conf / config).read_text(encoding="utf-8")
    (conf / config).write_text(re.sub(r"\btextgen-\d+:", "127.0.0.1:", text), encoding="utf-8")
    # -p: the pid file and temporary paths go under tmp_path, as under /tmp/nginx/ in the image
    command = [nginx, "-t", "-p", f"{tmp_path}/", "-e", "stderr", "-c", str(conf / config)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "test is successful" in proc.stderr, proc.stderr


def test_nginx_proxies_grpc_without_resending_calls() -> None:
    from service.settings import ServerSettings

    for config in ("nginx.conf", "nginx.ci.conf"):
        text = (DEPLOY / "nginx" / config).read_text(encoding="utf-8")
        assert re.search(r"^\s*listen\s+\S+\s+http2;", text, flags=re.MULTILINE), config  # h2c: gRPC needs HTTP/2
        assert re.search(r"^\s*grpc_pass grpc://textgen;", text, flags=re.MULTILINE), config
        assert re.search(r"^\s*include proxy\.conf;", text, flags=re.MULTILINE), config
    proxy = (DEPLOY / "nginx" / "proxy.conf").read_text(encoding="utf-8")
    directives = dict(
        line.strip().rstrip(";").split(None, 1)
        for line in proxy.splitlines()
        if line.strip().startswith(("grpc_", "client_max_body_size")) and "_set_header" not in line
    )
    # Every call's principal is the client's address, whatever the client sent (the replicas trust this header).
    assert re.search(r"^grpc_set_header x-textgen-principal \$remote_addr;", proxy, flags=re.MULTILINE)
    # Another replica only when this one could not be reached: never `non_idempotent`, which would send a
    # generation that already reached a replica to a second one.
    assert directives["grpc_next_upstream"].split() == ["error", "timeout"]
    # The largest request the server accepts (one message plus gRPC's 5-byte frame header) passes the proxy.
    size = directives["client_max_body_size"]
    limit = int(size[:-1]) * {"k": 1 << 10, "m": 1 << 20}[size[-1]]
    assert limit >= ServerSettings.model_fields["max_message_bytes"].default + 5


def _directives(text: str) -> dict[str, str]:
    """Each simple directive of an nginx config file (last one wins), header-setting ones left out."""
    return {
        name: value
        for line in text.splitlines()
        if (stripped := line.strip()).endswith(";") and not stripped.startswith("#")
        for name, _, value in [stripped.rstrip(";").partition(" ")]
        if not name.endswith("_set_header")
    }


def _bytes(size: str) -> int:
    return int(size[:-1]) * {"k": 1 << 10, "m": 1 << 20}[size[-1]] if size[-1] in "km" else int(size)


def test_nginx_proxies_the_http_api_unbuffered() -> None:
    """The HTTP API's server block: /v1/ and the health paths to the replicas' HTTP ports, server-sent events
    passed on as written, the principal named by nginx, the server's request size limit, no call sent twice."""
    from service.settings import ServerSettings

    for config in ("nginx.conf", "nginx.ci.conf"):
        text = (DEPLOY / "nginx" / config).read_text(encoding="utf-8")
        (server,) = re.findall(r"server \{\s*listen\s+(\S+?);\s*include http_proxy\.conf;\s*\}", text)
        assert server.endswith("8000"), config
    proxy = (DEPLOY / "nginx" / "http_proxy.conf").read_text(encoding="utf-8")
    directives = _directives(proxy)
    assert directives["proxy_buffering"] == "off" and directives["proxy_http_version"] == "1.1"
    assert re.search(r'^proxy_set_header Connection "";', proxy, flags=re.MULTILINE)  # upstream keepalive
    assert re.search(r"^proxy_set_header x-textgen-principal \$remote_addr;", proxy, flags=re.MULTILINE)
    assert directives["proxy_next_upstream"].split() == ["error", "timeout"]  # never non_idempotent
    assert directives["proxy_read_timeout"] == "15m"
    assert _bytes(directives["client_max_body_size"]) == ServerSettings.model_fields["max_message_bytes"].default
    # idle upstream connections let go before a replica's http_idle_seconds closes them under nginx
    for config in ("nginx.conf", "nginx.ci.conf"):
        text = (DEPLOY / "nginx" / config).read_text(encoding="utf-8")
        (upstream,) = re.findall(r"upstream textgen_http \{(.*?)\}", text, flags=re.DOTALL)
        (idle,) = re.findall(r"^\s*keepalive_timeout (\d+)s;", upstream, flags=re.MULTILINE)
        assert int(idle) < ServerSettings.model_fields["http_idle_seconds"].default, config
    routed = re.findall(r"location (.+?) \{\s*proxy_pass http://textgen_http;\s*\}", proxy)
    assert routed == ["/v1/", "~ ^/(health|health/ready|ready)$"]
