#!/usr/bin/env bash
# Debian packages the deployment tests use: Prometheus and promtool, the Docker engine (started by hand by the
# live stack test), debootstrap (builds the local base image, since no image can be pulled), nginx (`nginx -t`
# checks the proxy configs; the package's service is not started where policy-rc.d forbids it, as in
# containers). Idempotent.
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
