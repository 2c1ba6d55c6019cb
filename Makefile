# The two set-up commands of the README: `make run` and `make test`.
# Both create .venv on first use and install the package into it; later calls reuse it
# (the stamp is refreshed when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build; an unpinned torch would pull CUDA packages
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[full,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/splitexit sim demo

# buf: a standard gRPC command-line client (server reflection) for tests/test_cloud_grpc_cli.py;
# from the npm registry when npm is there, else that one test is skipped
TOOLS  := .tools/.installed
$(TOOLS):
	@if command -v npm >/dev/null 2>&1 && npm install --silent --prefix .tools @bufbuild/buf@1.75.0; \
	then touch $(TOOLS); else echo "note: buf not installed (no npm?): the gRPC CLI test will be skipped"; fi

# the type check of the whole package first (tools/typecheck.py: mypy, zero errors), then the suite
test: $(STAMP) $(TOOLS)
	$(BIN)/python tools/typecheck.py
	$(BIN)/python -m pytest -q

# The everyday lane while editing: no type check, no test marked slow (benchmarks, training,
# worker processes, mDNS); `make test` runs everything.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Regenerates protos/splitexit/proto/*_pb2*.py(i) from the .proto files (commit them).
protos: $(STAMP)
	$(BIN)/python -m splitexit.proto.generate

clean:
	rm -rf $(VENV) runs .pytest_cache .tools .cache/typecheck .cache/mypy-cache
