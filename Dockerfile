# textgen images, two targets:
#   serve (the default, last stage): `textgen serve` on ONNX Runtime, without torch.
#   trainer: torch and the exporter; by default trains the default model and exports bundle /models/default/1.
#     docker build --network host -t textgen .
#     docker build --network host --target trainer -t textgen-trainer .
# Both install their dependencies from the committed, hash-checked locks in deploy/lock (`make lock` remakes them).
# deploy/docker-compose.yml builds and runs both. No BuildKit-only syntax (heredocs, cache mounts, # syntax=):
# the CI engine (Debian's dockerd 20.10, with no registry to fetch a Dockerfile frontend from) builds it too.
# BuildKit (compose, Docker 23+) builds only the stages a target needs; the legacy builder (DOCKER_BUILDKIT=0)
# builds every stage before it, so there `serve` also builds the trainer's torch layer.

FROM python:3.11-slim AS runtime
# A venv, because the CI stand-in for this base image is Debian's python3 (no `python`, Debian-managed site
# packages); in the real image it costs nothing. One fixed numeric uid, so that what the trainer writes into a
# volume the server can read, and so that orchestrators can verify the user is not root.
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 textgen \
    && useradd --system --uid 10001 --gid textgen --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin textgen \
    && mkdir -p /models /runs && chown textgen:textgen /models /runs


# The project's code, once for both images; each copies it in after its dependencies.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY textgen /src/textgen/
COPY training /src/training/
COPY exporter /src/exporter/
COPY service /src/service/
COPY bench /src/bench/


FROM runtime AS serve-build
WORKDIR /src
# Dependencies first, from the committed locks alone (deploy/lock, made by `make lock` from pyproject.toml): every
# package pinned and hash-checked, wheels only, so every build installs the same bits; a code edit rebuilds only
# the layers after `COPY --from=source`. pip's resolver still runs, so a lock missing a dependency fails the build.
COPY deploy/lock/serve.txt deploy/lock/serve-cuda.txt lock/
# CUDA_LIBS: the CUDA runtime and cuDNN wheels that onnxruntime-gpu's CUDAExecutionProvider loads (about 2 GB
# from PyPI), locked in serve-cuda.txt. On for the production image. The CI override (deploy/docker-compose.ci.yml)
# sets it to "" so a CI run does not download gigabytes: serve.txt, and the server runs on CPUExecutionProvider.
# Any other value must be what serve-cuda.txt was compiled from (`make lock` reads this default).
ARG CUDA_LIBS="onnxruntime-gpu[cuda,cudnn]"
RUN lock=lock/serve-cuda.txt \
    && if [ -z "$CUDA_LIBS" ]; then lock=lock/serve.txt; \
       elif ! grep -qxF "# input: $CUDA_LIBS" "$lock"; then \
           echo "CUDA_LIBS=$CUDA_LIBS is not what $lock was compiled from: change its default and run make lock" >&2; \
           exit 1; \
       fi \
    && pip install --require-hashes --only-binary :all: -r "$lock"
COPY --from=source /src ./
RUN pip install --no-deps --no-build-isolation . && pip check


FROM runtime AS trainer
WORKDIR /src
COPY deploy/lock/trainer.txt lock/
# torch pinned as the README installs it, from the lock like everything else (see serve-build). From PyPI this is the
# CUDA build of torch with its own CUDA wheels (locked too), so the trainer uses a GPU when it is given one. The
# exporter verifies bundles on ONNX Runtime's CPU provider: the 24 MB CPU runtime (the cpu extra) is enough.
# TORCH is what trainer.txt was compiled from (`make lock` reads this default); any other value fails the build.
ARG TORCH="torch==2.13.0"
RUN if ! grep -qxF "# input: $TORCH" lock/trainer.txt; then \
        echo "TORCH=$TORCH is not what lock/trainer.txt was compiled from: change its default and run make lock" >&2; \
        exit 1; \
    fi \
    && pip install --require-hashes --only-binary :all: -r lock/trainer.txt
COPY --from=source /src ./
RUN pip install --no-deps --no-build-isolation . && pip check
COPY deploy/train-and-export.sh /usr/local/bin/textgen-train-and-export
USER 10001:10001
WORKDIR /runs
ENV TEXTGEN_MODEL_REPOSITORY=/models TEXTGEN_RUNS=/runs TEXTGEN_MODEL_NAME=default TEXTGEN_MODEL_VERSION=1 \
    TEXTGEN_TRAIN_STEPS=1000
CMD ["textgen-train-and-export"]


FROM runtime AS serve
COPY --from=serve-build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /models
# Every model in the repository volume, on all interfaces; Prometheus /metrics over HTTP on its own port.
ENV TEXTGEN_MODEL_REPOSITORY=/models TEXTGEN_HOST=0.0.0.0 TEXTGEN_PORT=50051 TEXTGEN_METRICS_PORT=9400
# onnxruntime's CUDA provider library finds libcudart, libcublas(Lt), libcurand, libcufft and libcudnn by soname,
# and the CUDA_LIBS wheels put them under site-packages/nvidia where the loader does not look; without this the
# server silently falls back to the CPU. (libcuda.so.1 comes from the host driver through the GPU reservation.
# Nothing to find when CUDA_LIBS is empty.)
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
EXPOSE 50051 9400
# grpc.health.v1 Check on the local port (TEXTGEN_PORT). The start period covers loading the models.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthprobe", "--timeout", "4"]
# SIGTERM drains running streams for up to TEXTGEN_GRACE_SECONDS (30 s): compose gives it stop_grace_period 40s.
CMD ["textgen", "serve"]
