# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export TOKENIZERS_PARALLELISM := false

# Real images for the mini-LLaVA corpora (pipelines/corpora): Debian packages, installed once
# when apt-get is there (CI, the cluster images); without them those tests skip, saying why.
DATA_PACKAGES := dataset-fashion-mnist openclipart-png openclipart-svg
DATA_STAMP    := .cache/.data-packages

# lmms-eval in its own venv that sees ours (see requirements-lmms.txt); tests/test_lmms_eval.py uses it.
LMMS_VENV  := .cache/lmms-venv
LMMS_STAMP := $(LMMS_VENV)/.installed

.PHONY: install data lmms-env test demo tiny-demo bench clean

$(STAMP): pyproject.toml constraints.txt requirements-nodeps.txt | $(DATA_STAMP)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

$(DATA_STAMP):
	@mkdir -p .cache
	@if dpkg -s $(DATA_PACKAGES) >/dev/null 2>&1; then touch $@; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq --no-install-recommends $(DATA_PACKAGES) || \
	   (apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DATA_PACKAGES))) && touch $@; \
	else echo "note: cannot install $(DATA_PACKAGES) here (needs root + apt-get); real-image corpora tests will skip"; fi

data: $(DATA_STAMP)

$(LMMS_STAMP): requirements-lmms.txt $(STAMP)
	rm -rf $(LMMS_VENV) && $(PY) -m venv $(LMMS_VENV)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" > \
	  "$$($(LMMS_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/autoselect-project.pth"
	$(LMMS_VENV)/bin/python -m pip install -q -c constraints.txt -r requirements-lmms.txt
	$(LMMS_VENV)/bin/python -m pip install -q --no-deps lmms-eval==0.7.3
	touch $@

lmms-env: $(LMMS_STAMP)

install: $(STAMP)

test: $(STAMP) $(LMMS_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP) | $(DATA_STAMP)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

tiny-demo: $(STAMP)
	$(BIN)/python examples/tiny_demo.py $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/prefill.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache outputs
