# Two entry points: `make demo` and `make test`. Both create .venv with the pinned
# dependencies on first use (PyTorch installs as the CPU build from local files).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest SDK we serve, in its own environment, for its compatibility test.
SDK025 := .venv-tinker025
SDK025_STAMP := $(SDK025)/.installed
# tinker-cookbook pins its own transformers, so its recipes run from their own environment.
COOKBOOK := .venv-cookbook
COOKBOOK_STAMP := $(COOKBOOK)/.installed
COOKBOOK061 := .venv-cookbook061
COOKBOOK061_STAMP := $(COOKBOOK061)/.installed

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

$(COOKBOOK_STAMP):
	python3 -m venv $(COOKBOOK)
	$(COOKBOOK)/bin/python -m pip install --quiet tinker-cookbook==0.5.5 tinker==0.38.0 \
		torch==2.13.0 transformers==5.5.4 tokenizers==0.22.2 huggingface_hub==1.33.0 \
		datasets==5.2.0 chz==0.4.0 tml-renderers==0.2.1 numpy==2.4.6 \
		math-verify==0.9.0 pylatexenc==2.11 sympy==1.14.0
	touch $(COOKBOOK_STAMP)

# tinker-cookbook 0.6.1 asks for tml-renderers>=0.4.1, which the package index here does not
# carry. Only the cookbook's o200k/Kimi tokenizers import it (never the Qwen3 path the tests
# use), so 0.2.1 stands in: the cookbook goes in with --no-deps after its other requirements.
$(COOKBOOK061_STAMP):
	python3 -m venv $(COOKBOOK061)
	$(COOKBOOK061)/bin/python -m pip install --quiet tinker==0.38.0 torch==2.13.0 \
		transformers==5.5.4 tokenizers==0.22.2 huggingface_hub==1.33.0 datasets==5.2.0 \
		chz==0.4.0 tml-renderers==0.2.1 numpy==2.4.6 math-verify==0.9.0 pylatexenc==2.11 \
		sympy==1.14.0 aiohttp==3.14.5 anyio==4.16.0 blobfile==3.3.0 cloudpickle==3.1.3 \
		pillow==13.0.0 pyrage==1.4.0 rich==15.0.0 safetensors==0.8.0 termcolor==3.3.0 \
		tiktoken==0.14.0 tqdm==4.70.1
	$(COOKBOOK061)/bin/python -m pip install --quiet --no-deps tinker-cookbook==0.6.1
	touch $(COOKBOOK061_STAMP)

test: $(STAMP) $(SDK025_STAMP) $(COOKBOOK_STAMP) $(COOKBOOK061_STAMP) lint
	$(VENV)/bin/pytest -q

# ruff; the layer contracts of pyproject.toml (an import running back up fails); mypy.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

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
	rm -rf $(VENV) $(SDK025) $(COOKBOOK) $(COOKBOOK061) .pytest_cache .ruff_cache
