# The two set-up commands of the README: `make run` and `make test`.
# Both create .venv on first use and install the package into it; later calls reuse it
# (the stamp is refreshed when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build; an unpinned torch would pull CUDA packages
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/splitexit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerates protos/splitexit/proto/*_pb2*.py(i) from the .proto files (commit them).
protos: $(STAMP)
	$(BIN)/python -m splitexit.proto.generate

clean:
	rm -rf $(VENV) runs .pytest_cache
