# Entry points for newcomers and CI. Every target runs inside .venv, which
# `make setup` creates from scratch with the pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GEN := hitl_service/gen
STAMP := $(VENV)/.installed

.PHONY: setup run test lint proto proto-check bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

run: setup
	$(BIN)/hitl-service serve

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

# The one way to generate stubs (see conventions 2.2): protoc writes imports
# for the proto path, so rewrite them to the package the stubs live in.
proto: setup
	rm -rf $(GEN)/hitl
	mkdir -p $(GEN)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
	    --python_out=$(GEN) --grpc_python_out=$(GEN) \
	    --mypy_out=$(GEN) --mypy_grpc_out=$(GEN) proto/hitl/v1/*.proto
	sed -i.bak -E -e 's/^(from|import) hitl\./\1 hitl_service.gen.hitl./' \
	    -e "s/(DESCRIPTOR, ')hitl\./\1hitl_service.gen.hitl./" $(GEN)/hitl/v1/*.py $(GEN)/hitl/v1/*.pyi
	rm $(GEN)/hitl/v1/*.bak
	touch $(GEN)/__init__.py $(GEN)/hitl/__init__.py $(GEN)/hitl/v1/__init__.py

# CI: regenerated stubs must equal the committed ones (untracked files too).
proto-check: proto
	git diff --exit-code -- $(GEN)
	test -z "$$(git status --porcelain -- $(GEN))"

bench: setup
	@echo "make bench: not implemented yet (see the benchmark issue)"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
