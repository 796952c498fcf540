# dutserver — the usual targets. Everything installs into .venv; nothing global but chromium (CI).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PORT    ?= 8080
DB      ?= dutserver.db
STAMP   := $(VENV)/.installed
TOOLS   := $(VENV)/.installed-native
NATIVE  := build/native

# `make run`, `make test` and `make bench` run the wheel's build of the sources as they are
# (hatch_build.py: the hot path compiled with mypyc), installed into build/native and put first
# on the path; PYTHONSAFEPATH keeps `python -m dutserver` run from this directory from
# importing the sources instead. pytest's `pythonpath = ["."]` would put them first too, so
# `make test` runs it with tests/ only (bench/ still imports: the editable install's path).
# DUTSERVER_NATIVE=0 runs the sources instead, interpreted, and builds nothing.
ifeq ($(DUTSERVER_NATIVE),0)
BUILT   :=
ON_BUILD :=
PYTEST_PATH :=
else
BUILT   := $(NATIVE)/.built
ON_BUILD := PYTHONPATH=$(CURDIR)/$(NATIVE) PYTHONSAFEPATH=1
PYTEST_PATH := -o pythonpath=tests
endif

# What the wheel is built from. An edit (newer than the build) or a file added or removed (the
# list below changes) rebuilds build/native; nothing else does.
WHEEL_FILES := $(shell find dutserver web cli -name __pycache__ -prune -o -type f \
                 ! -name '*.py[co]' -print 2>/dev/null | LC_ALL=C sort) pyproject.toml hatch_build.py

.PHONY: install install-test native run test bench lint clean FORCE

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# The package editable (its dependencies, the commands) and what builds the wheel (hatchling,
# mypy: the `native` extra).
$(TOOLS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[native]'
	touch $(TOOLS)

install: $(TOOLS)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP) $(TOOLS)

install-test: $(STAMP)

FORCE:

build/wheel-files: FORCE
	@mkdir -p build
	@printf '%s\n' $(WHEEL_FILES) > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

# The wheel's build (compiled: DUTSERVER_NATIVE=1 lets no failure pass as a pure build)
# installed into build/native; the intermediate files stay in build/native-work, so that a
# rebuild compiles again only what changed. The old build is replaced once the new one is whole.
$(NATIVE)/.built: $(WHEEL_FILES) build/wheel-files $(TOOLS)
	rm -rf $(NATIVE).new
	DUTSERVER_NATIVE=1 DUTSERVER_NATIVE_WORK=build/native-work \
	  $(BIN)/pip install -q --no-deps --no-build-isolation --target $(NATIVE).new . \
	  || { echo "make: the hot path did not compile (above; all of mypyc's output in" \
	       "build/native-work/mypyc.log). DUTSERVER_NATIVE=0 make … runs the sources." >&2; exit 1; }
	rm -rf $(NATIVE) && mv $(NATIVE).new $(NATIVE)
	touch $@

native: $(BUILT)

run: $(TOOLS) $(BUILT)
	@if [ ! -f "$(DB)" ]; then \
	  pw="$${ADMIN_PASSWORD:-$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(12))')}"; \
	  printf '%s\n' "$$pw" | $(ON_BUILD) $(BIN)/dutserver addaccount "$(DB)" admin admin >/dev/null && \
	  echo "Created $(DB) with admin account 'admin', password: $$pw"; \
	fi
	$(ON_BUILD) $(BIN)/dutserver server $(PORT) $(DB)

test: $(STAMP) $(BUILT)
	$(ON_BUILD) $(BIN)/python -m pytest -q $(PYTEST_PATH)

bench: $(STAMP) $(BUILT)
	$(ON_BUILD) $(BIN)/python -m bench.run

lint: install-test
	$(BIN)/ruff check dutserver tests bench cli hatch_build.py
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache test-artifacts
