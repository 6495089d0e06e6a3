# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv at the repository root and install Sabot in editable
# mode with its dev extra (pytest, the embedded broker, the flights data).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard sabot/ext/*.pyx sabot/ext/*.pxd)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/throughput.py

clean:
	rm -rf build $(VENV) sabot/ext/*.so sabot/ext/*.c
