#!/bin/sh
# The trainer image's default command (docker compose --profile train): train the default model and publish it as
# bundle /models/$TEXTGEN_MODEL_NAME/$TEXTGEN_MODEL_VERSION, once. Like `make serve`: an interrupted run (its
# last.pt is in the runs volume) is resumed, a finished one is reused, and an existing bundle version is left
# alone because versions are immutable (export a new version to publish a new model).
set -eu
name=${TEXTGEN_MODEL_NAME:-default}
version=${TEXTGEN_MODEL_VERSION:-1}
steps=${TEXTGEN_TRAIN_STEPS:-1000}
run=${TEXTGEN_RUNS:-/runs}/$name
bundle=${TEXTGEN_MODEL_REPOSITORY:-/models}/$name/$version

if [ -f "$bundle/manifest.json" ]; then
    echo "bundle $bundle exists (versions are immutable): nothing to do"
    exit 0
fi
if [ -f "$run/last.pt" ]; then
    textgen train --out "$run" --resume --quiet  # a finished run resumes as a no-op
else
    textgen train --out "$run" --max-steps "$steps" --eval-every 250 --quiet
fi
mkdir -p "$(dirname "$bundle")"
textgen export "$run/best.pt" --out "$bundle"
