# Two entry points: `make demo` and `make test`. Both create .venv with the pinned
# dependencies on first use (PyTorch installs as the CPU build from local files).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format proto bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lathe demo

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

# Regenerate the protobuf module from src/lathe/api/wire/tinker_wire.proto.
proto: $(STAMP)
	$(PY) -m pip install --quiet grpcio-tools==1.85.1
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. lathe/api/wire/tinker_wire.proto

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
