# Two commands for a fresh machine:
#   make serve   create .venv, install everything, train the default model and sample from it
#   make test    create .venv if needed and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/default
STEPS ?= 1000

.PHONY: serve test install lint clean

# torch goes first, pinned: the local CPU wheel; the project's torch range then installs nothing more.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,serve,dev]'
	touch $@

install: $(BIN)/.installed

# An interrupted run (Ctrl-C saves last.pt) is resumed rather than started again.
$(RUN_DIR)/best.pt: | $(BIN)/.installed
	if [ -f $(RUN_DIR)/last.pt ]; then $(BIN)/textgen train --out $(RUN_DIR) --resume; \
	else $(BIN)/textgen train --out $(RUN_DIR) --max-steps $(STEPS) --eval-every 250; fi

serve: $(RUN_DIR)/best.pt
	$(BIN)/textgen sample $(RUN_DIR)/best.pt --prompt 'def ' --max-tokens 600 --temperature 0.7 --seed 1

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
