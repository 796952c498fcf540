# dutserver — the usual targets. Everything installs into .venv; nothing global but chromium (CI).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PORT    ?= 8080
DB      ?= dutserver.db
STAMP   := $(VENV)/.installed

.PHONY: install install-test native run test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[native]'
	@# The hot path compiled (dutserver/native.py); without a C compiler it runs interpreted.
	-$(BIN)/dutserver compile

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install-test: $(STAMP)

# Compiles the hot path unless build/native is a build of the sources as they are (a no-op then).
native: $(STAMP)
	$(BIN)/dutserver compile

run: install
	@if [ ! -f "$(DB)" ]; then \
	  pw="$${ADMIN_PASSWORD:-$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(12))')}"; \
	  printf '%s\n' "$$pw" | $(BIN)/dutserver addaccount "$(DB)" admin admin >/dev/null && \
	  echo "Created $(DB) with admin account 'admin', password: $$pw"; \
	fi
	$(BIN)/dutserver server $(PORT) $(DB)

test: native
	$(BIN)/python -m pytest -q

bench: native
	$(BIN)/python -m bench.run

lint: install-test
	$(BIN)/ruff check dutserver tests bench cli
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache test-artifacts
