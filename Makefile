# Two entry points: `make demo` and `make test`. Both create .venv with the pinned
# dependencies on first use (PyTorch installs as the CPU build from local files).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest SDK we serve, in its own environment, for its compatibility test.
SDK025 := .venv-tinker025
SDK025_STAMP := $(SDK025)/.installed

.PHONY: demo test lint format proto bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lathe demo

$(SDK025_STAMP):
	python3 -m venv $(SDK025)
	$(SDK025)/bin/python -m pip install --quiet tinker==0.25.0 transformers==5.24.0 \
		numpy==2.4.6 protobuf==7.36.2 pydantic==2.14.4
	touch $(SDK025_STAMP)

test: $(STAMP) $(SDK025_STAMP) lint
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
	rm -rf $(VENV) $(SDK025) .pytest_cache .ruff_cache
