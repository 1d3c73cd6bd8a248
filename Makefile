# Two entry points: `make demo` trains the default config on the bundled digits; `make test` lints and tests.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The PyTorch pair this project is developed with; override (e.g. TORCH_SPEC=torch) on other machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/demo.yaml

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stn-train fit --config $(CONFIG) --test_after_fit true

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy stn_lightning kernels

# The suite's files spread over every core (pytest-xdist; a file's tests share its fixtures in one worker).
test: lint
	$(PY) -m pytest -q -n auto --dist loadfile

clean:
	rm -rf lightning_logs .pytest_cache .mypy_cache .ruff_cache
