# CI stand-in for prom/prometheus: no image registry can be reached on CI machines, so this is Debian's own
# Prometheus binary (it links only libc) on the locally built base image. Only the binary is taken out of the
# package: its web-UI and init-script dependencies are not needed to scrape and answer queries.
FROM python:3.11-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /tmp/prometheus-deb
# The version is the base image's Debian release's (bookworm: 2.42, the same build as the host's promtool that
# checks the config), so it is not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get download prometheus \
    && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x -C / ./usr/bin/prometheus \
    && rm -rf /tmp/prometheus-deb /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /prometheus && chown 65534:65534 /prometheus
WORKDIR /prometheus
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
