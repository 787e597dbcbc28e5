# Every target that runs Python first makes sure .venv exists and holds the project.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Ray (about 2.5 minutes more to install) only for the tests of multi_worker jobs.
RAY_STAMP := $(VENV)/.ray-installed-stamp
# The demo needs the server and scikit-learn (its offline digits), not the dev tools.
DEMO_STAMP := $(VENV)/.demo-installed-stamp

.PHONY: demo test test-fast lint proto dashboard bench certs gpu-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,dev]'
	touch $@

$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[server,dev,ray]'
	touch $@

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

demo: $(DEMO_STAMP)
	$(PY) -m service.cli.demo

# Two processes, each taking whole files (a file's module fixtures, such as the Ray
# cluster, start once); more would only contend for a 2-core CI machine.
TEST_WORKERS ?= 2

test: $(RAY_STAMP) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The quick loop while editing: no worker processes, servers or trainings.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

proto: $(STAMP)
	$(PY) -m service.protogen

# deploy/grafana/dashboards/ntrain.json, from deploy/grafana/dashboard.py.
dashboard: $(STAMP)
	$(PY) deploy/grafana/dashboard.py

bench: $(STAMP)
	$(PY) -m benchmarks.throughput --json benchmarks/results/throughput.json
	$(PY) -m benchmarks.step_anatomy --json benchmarks/results/step_anatomy.json
	$(PY) -m benchmarks.service_benchmark --json benchmarks/results/service.json
	$(PY) -m benchmarks.metrics_overhead --json benchmarks/results/metrics_overhead.json

# First-run secrets for deploy/ (a private CA, server and client certificates,
# tokens, the metrics password) in deploy/secrets/; again to renew the certificates.
certs: $(STAMP)
	NTRAIN=$(VENV)/bin/ntrain deploy/make-certs.sh deploy/secrets

# On a real GPU host: one-GPU and all-GPU jobs, XLA, bfloat16, NCCL, placement, memory metrics.
gpu-smoke: $(STAMP)
	PYTHON=$(PY) deploy/gpu-smoke.sh

clean:
	rm -rf $(VENV) build *.egg-info
