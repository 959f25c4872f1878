# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LAB    ?= lab
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint unit integration bench clean services e2e

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || ./scripts/install-services.sh --python-only
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: create the local lab from state/ and walk the whole migration on it
run: setup
	$(BIN)/python -m reconciler.demo --lab $(LAB) --state state

## guide: rewrite the command outputs in docs/user-guide.md from a fresh run of the walk
## (`scripts/guide_outputs.py --check` only compares, as tests/test_guide_outputs.py does)
.PHONY: guide
guide: setup
	$(BIN)/python scripts/guide_outputs.py

## test: install the real services (root), lint, type-check, layering, the whole suite
test: setup services lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

services:
	./scripts/install-services.sh

lint: setup
	$(BIN)/ruff check reconciler tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

## e2e: the whole migration on real servers (root: Postfix, Dovecot, BIND, sshd via apt):
## 50 users and 5,000 messages without a fault, then each fault in its own run of 12 users
## and 1,000 messages; prints the ledger tables (tests/e2e/README.md); about an hour
E2E_FAULTS ?= ssh-drop,daemon-kill,journal-lost,reload-fails,rental-down,dns-refused
e2e: setup services
	$(BIN)/python -m tests.e2e.run --users 50 --messages 5000 --rate 6 --faults none \
	  --markdown e2e-ledger-full.md
	$(BIN)/python -m tests.e2e.run --users 12 --messages 1000 --rate 4 --batches 4 \
	  --faults $(E2E_FAULTS) --markdown e2e-ledger-faults.md

## bench: observe/plan in one process (plan_bench.py), whole mailrec processes vs the goals
## (process_bench.py), daemon rounds on an unchanged and a new commit (daemon_bench.py),
## commit-to-applied on the e2e harness's real servers (e2e_bench.py, root)
bench: setup
	$(BIN)/python bench/plan_bench.py
	$(BIN)/python bench/process_bench.py
	$(BIN)/python bench/daemon_bench.py
	$(BIN)/python bench/e2e_bench.py

clean:
	rm -rf $(VENV) $(LAB) .mypy_cache .ruff_cache
