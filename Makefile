# The two commands a user needs: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install test run clean

install: $(STAMP)

# Reinstall only when the project's own dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/voxtune serve

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
