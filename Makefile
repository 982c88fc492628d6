# The two promised commands: `make demo` and `make test`. Each builds .venv on first use.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arbor demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check arbor tests benchmarks

bench: $(STAMP)
	for script in spawn ask checkpoint crash_recovery node_recovery; do \
		$(VENV)/bin/python -m benchmarks.bench_$$script || exit 1; \
	done

clean:
	rm -rf $(VENV) .arbor arbor-report.json
