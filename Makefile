# imgclf: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= demo_output
PYTEST := $(BIN)/python -m pytest
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test test-unit test-integration lint compile clean

# Re-installs only when the package definition changes.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(INSTALLED)

demo: install
	$(BIN)/imgclf demo-data --output $(DEMO_DIR)/digits
	$(BIN)/imgclf run-local --data $(DEMO_DIR)/digits --params pipelines/params/digits.yaml --output $(DEMO_DIR)/run

compile: install
	$(BIN)/imgclf compile

lint: install
	$(BIN)/ruff check trainer components pipelines tests benchmarks

test-unit: install
	@echo "== unit tier =="
	$(PYTEST) tests/unit

test-integration: install
	@echo "== integration tier (kfp.local) =="
	$(PYTEST) tests/integration

# Each tier prints its own banner and pytest summary, one after another.
test: lint test-unit test-integration
	@echo "== container tier: NOT RUN - no container tests exist yet (issue 6) =="
	@echo "== e2e tier (kind): NOT RUN - needs a Kubernetes cluster, which these machines cannot start =="

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
