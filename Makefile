# Two commands for a fresh machine:
#   make serve   create .venv, install everything, train and export the default model (once), then serve it
#   make test    create .venv if needed and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/default
STEPS ?= 1000
BUNDLES ?= bundles
MODEL ?= default
PORT ?= 50051
ONNXRUNTIME ?= gpu

.PHONY: serve sample test install lint proto lock clean bench

# torch goes first, pinned: the local CPU wheel; the project's torch range then installs nothing more.
# ONNXRUNTIME=cpu installs the 24 MB CPU-only runtime instead of onnxruntime-gpu (in a fresh .venv: never both).
$(BIN)/.installed: pyproject.toml
	@case '$(ONNXRUNTIME)' in cpu|gpu) ;; *) echo "ONNXRUNTIME must be cpu or gpu, not '$(ONNXRUNTIME)'" >&2; exit 1;; esac
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,serve,$(ONNXRUNTIME),dev,bench]'
	touch $@

install: $(BIN)/.installed

# An interrupted run (Ctrl-C saves last.pt) is resumed rather than started again.
$(RUN_DIR)/best.pt: | $(BIN)/.installed
	if [ -f $(RUN_DIR)/last.pt ]; then $(BIN)/textgen train --out $(RUN_DIR) --resume; \
	else $(BIN)/textgen train --out $(RUN_DIR) --max-steps $(STEPS) --eval-every 250; fi

# Order-only: a bundle version is immutable, so a newer checkpoint does not overwrite it (export a new version).
$(BUNDLES)/$(MODEL)/1/manifest.json: | $(RUN_DIR)/best.pt
	$(BIN)/textgen export $(RUN_DIR)/best.pt --out $(BUNDLES)/$(MODEL)/1

serve: $(BUNDLES)/$(MODEL)/1/manifest.json
	$(BIN)/textgen serve --model-repository $(BUNDLES) --port $(PORT)

sample: | $(RUN_DIR)/best.pt
	$(BIN)/textgen sample $(RUN_DIR)/best.pt --prompt 'def ' --max-tokens 600 --temperature 0.7 --seed 1

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# Regenerate the committed gRPC stubs after editing proto/ (tests/test_proto.py fails while they drift).
proto: $(BIN)/.installed
	$(BIN)/python scripts/gen_stubs.py

# Regenerate the images' lock files (deploy/lock/) after editing dependencies in pyproject.toml, or the Dockerfile's
# CUDA_LIBS or TORCH (tests/test_lock.py fails until then). Resolves against PyPI, keeping the other pins;
# UPGRADE=1 moves every pin to the newest release the requirements allow.
UV_VERSION ?= 0.13.9
lock: | $(BIN)/.installed
	$(BIN)/pip install --quiet 'uv==$(UV_VERSION)'
	$(BIN)/python scripts/lock.py --uv $(BIN)/uv $(if $(UPGRADE),--upgrade)

clean:
	rm -rf $(VENV) runs bundles

# The runs behind docs/benchmarks.md (hours on 2 CPU cores; the data sets are in ../shared/data).
DATA ?= ../shared/data
# Zaremba et al.'s small PTB model: their lr 1 and clip 5 are for a loss summed over the 20 steps; ours is the
# mean, so the same update is lr 20 and clip 0.25.
PTB_SMALL = --data $(DATA)/ptb --level word --hidden 200 --layers 2 --batch-size 20 --bptt 20 --optimizer sgd \
	--lr 20 --clip 0.25 --epochs 13 --eval-every 2323

bench: | $(BIN)/.installed
	[ -f runs/shakespeare/best.pt ] || $(BIN)/textgen train --data $(DATA)/tinyshakespeare/input.txt --split 0.9,0.1,0 \
		--hidden 512 --layers 2 --dropout 0.2 --batch-size 32 --bptt 128 --max-steps 1900 --eval-every 250 --out runs/shakespeare
	[ -f runs/ptb-650/best.pt ] || $(BIN)/textgen train --data $(DATA)/ptb --level word --hidden 650 --layers 2 \
		--dropout 0.5 --batch-size 20 --bptt 35 --max-steps 60 --eval-every 60 --out runs/ptb-650
	$(BIN)/textgen bench quality runs/shakespeare/best.pt --split valid --tokens 111520 --block 256 --out bench-results/quality-shakespeare
	$(BIN)/textgen bench serve runs/shakespeare/best.pt --out bench-results/serve-char512
	$(BIN)/textgen bench serve runs/ptb-650/best.pt --precisions fp32,int8 --out bench-results/serve-word650
	$(BIN)/textgen bench train --data-root $(DATA) --out bench-results/train
	$(BIN)/textgen bench train --data-root $(DATA) --presets word-2x200 --steps 300 --out bench-results/train-word300
	# each PTB run continues where it stopped (a finished run resumes to no more steps)
	if [ -f runs/ptb-small/last.pt ]; then $(BIN)/textgen train --out runs/ptb-small --resume --quiet; else \
		$(BIN)/textgen train $(PTB_SMALL) --schedule step --decay-after 4 --decay-factor 0.5 --out runs/ptb-small; fi
	if [ -f runs/ptb-small-tied/last.pt ]; then $(BIN)/textgen train --out runs/ptb-small-tied --resume --quiet; else \
		$(BIN)/textgen train $(PTB_SMALL) --tie-weights --dropout 0.25 --warmup-steps 0 --min-lr-ratio 0.01 \
		--out runs/ptb-small-tied; fi
	$(BIN)/textgen eval runs/ptb-small/best.pt --split test
	$(BIN)/textgen eval runs/ptb-small-tied/best.pt --split test
	$(BIN)/textgen bench curves runs/ptb-small runs/ptb-small-tied --labels "Zaremba small,tied + dropout 0.25" \
		--title "PTB word level, 2 x 200 LSTM, 13 epochs" --out bench-results/ptb-small.png
	$(BIN)/textgen bench curves runs/shakespeare --labels "2 x 512 LSTM" --title "tiny-shakespeare, char level" \
		--out bench-results/train-shakespeare.png
