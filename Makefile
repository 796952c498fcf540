# dutserver — the usual targets. Everything installs into .venv; nothing global but chromium (CI).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PORT    ?= 8080
DB      ?= dutserver.db
STAMP   := $(VENV)/.installed

.PHONY: install install-test run test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install-test: $(STAMP)

run: install
	@if [ ! -f "$(DB)" ]; then \
	  pw="$${ADMIN_PASSWORD:-$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(12))')}"; \
	  printf '%s\n' "$$pw" | $(BIN)/dutserver addaccount "$(DB)" admin admin >/dev/null && \
	  echo "Created $(DB) with admin account 'admin', password: $$pw"; \
	fi
	$(BIN)/dutserver server $(PORT) $(DB)

test: install-test
	$(BIN)/python -m pytest -q

bench: install-test
	$(BIN)/python -m bench.run

lint: install-test
	$(BIN)/ruff check dutserver tests bench cli
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
