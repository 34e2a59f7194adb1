# Entry points for newcomers and CI. Every target runs inside .venv, which
# `make setup` creates from scratch with the pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GEN := hitl_service/gen
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: setup run test lint proto proto-check bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,speed]'
	touch $(STAMP)

run: setup
	$(BIN)/hitl-service serve

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BENCH_STAMP)  # mypy also checks bench/, which imports the bench extra
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

# The benchmark (bench/README.md): the floor of the stack and hitl-service,
# interleaved over 3 rounds, about 6 minutes; BENCH_ARGS=--quick for ~2.
# The 5-minute RSS soak is its own target (not part of bench).
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,speed,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

soak: $(BENCH_STAMP)
	$(BIN)/python -m bench soak --minutes 5 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# API reference from the proto comments (scripts/gen_api_docs.py also fails
# when an RPC, message, field or enum value has no comment).
.PHONY: docs docs-check proto-breaking
docs: setup
	$(BIN)/python scripts/gen_api_docs.py --out docs/api.md

# CI: docs/api.md must be committed and equal to what the proto generates
# (compared with a fresh rendering, so a missing file fails too).
docs-check: setup
	@tmp=$$(mktemp) && trap 'rm -f "$$tmp"' EXIT && \
	$(BIN)/python scripts/gen_api_docs.py --out "$$tmp" && \
	if ! diff -u docs/api.md "$$tmp"; then \
	    echo "docs/api.md is out of date with proto/: run 'make docs' and commit it" >&2; exit 1; \
	fi && echo "docs/api.md is up to date"

# buf breaking against the last commit that changed proto/: with uncommitted
# proto changes that is the last commit touching proto/; on a clean tree
# (CI's fresh clone of main) it is the one before it, so the newest committed
# change to the contract is checked. Needs the git history (a full clone).
proto-breaking: setup
	@git rev-parse --git-dir >/dev/null || { echo "proto-breaking: not a git checkout" >&2; exit 1; }; \
	if [ "$$(git rev-parse --is-shallow-repository)" = true ]; then \
	    echo "proto-breaking: shallow clone; run 'git fetch --unshallow' first" >&2; exit 1; \
	fi; \
	if [ -n "$$(git status --porcelain -- proto)" ]; then \
	    base=$$(git log -n1 --format=%H -- proto); \
	else \
	    base=$$(git log -n1 --skip 1 --format=%H -- proto); \
	fi; \
	if [ -z "$$base" ]; then \
	    echo "proto-breaking: no earlier commit changed proto/; nothing to compare against (skipped)"; \
	else \
	    echo "proto-breaking: buf breaking against $$base ($$(git log -n1 --format=%s $$base))"; \
	    $(BIN)/buf breaking --against ".git#ref=$$base" && echo "proto-breaking: no breaking changes"; \
	fi

# Soak of the whole LiveChat flow (scripts/soak.py): starts, sends of every
# kind, agent replies through the fake LiveChat, stops; fails on any error or
# RSS growth over 5 %. SOAK_ARGS="--minutes 3" for a shorter run.
.PHONY: soak-livechat
soak-livechat: setup
	$(BIN)/python scripts/soak.py $(SOAK_ARGS)

# Churn run (scripts/churn.py), about 14 minutes: sessions started and ended
# every way (stops, agent/customer/router closes, timeouts, abandoned starts),
# streams opened and cancelled, client processes killed or left half-open,
# provider failures and expired tokens, and clock jumps past HITL_RETENTION;
# samples RSS, open files, threads, asyncio tasks, every in-memory container
# the service holds (scripts/churn_probe.py), the provider's connection pool,
# metric series and the store, and fails on anything that keeps growing.
# CHURN_ARGS="--store postgres --replicas 2" runs two replicas on PostgreSQL.
.PHONY: churn
churn: setup
	$(BIN)/python scripts/churn.py $(CHURN_ARGS)
