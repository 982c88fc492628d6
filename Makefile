# The two promised commands: `make demo` and `make test`. Each builds .venv on first use.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test prometheus lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arbor demo

test: $(STAMP) prometheus
	$(VENV)/bin/python -m pytest

# The monitoring tests run Debian's prometheus and promtool binaries; install them when
# missing. The tests start their own server on 127.0.0.1 and do not use the package's service.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

lint: $(STAMP)
	$(VENV)/bin/ruff check arbor tests benchmarks examples

bench: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[test,bench]"
	for script in spawn ask checkpoint crash_recovery node_recovery hosted; do \
		$(VENV)/bin/python -m benchmarks.bench_$$script || exit 1; \
	done

clean:
	rm -rf $(VENV) .arbor arbor-report.json
