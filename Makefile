# The two commands a user needs: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
# Test processes (pytest-xdist): the suite's files are shared out between them, a file's tests
# staying together so that its module fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: install test run clean browser gpu-check

install: $(STAMP)

# Reinstall only when the project's own dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[test]"
	@# pip byte-compiles file by file on one core; compileall shares the files out between all
	@# of them (about 25 s less on 2). A file that is not valid Python (a template shipped as
	@# .py) stays uncompiled, as pip leaves it.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

# mypy runs beside the tests, which leave a core idle at times (audio streamed at real-time
# pace, servers starting): its report comes after theirs, and either failing fails the target.
test: install browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@types=$$(mktemp); ($(BIN)/python -m mypy > $$types 2>&1; echo $$? >> $$types) & \
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile; tests=$$?; wait; \
	echo "mypy:"; head -n -1 $$types; status=$$(tail -n 1 $$types); rm -f $$types; \
	test $$tests -eq 0 && test $$status -eq 0

# The playground's browser test drives Debian's chromium: installed here when running as root
# (as CI does); elsewhere that test skips and says why.
browser:
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null 2>&1 \
		|| echo "could not install chromium: the browser test will skip"; fi

# On a machine with a CUDA GPU: the tests that need one (-m gpu: CUDA against the CPU, bf16,
# QLoRA, Liger, packed rows), then the training benchmark on the 0.5B model, LoRA, QLoRA and full.
gpu-check: install
	$(BIN)/python -m pytest -q -m gpu tests/train/test_cuda.py tests/audio/test_features.py
	$(BIN)/python benchmarks/train_throughput.py --lm 0.5b --device cuda --clips 200 --configs voxtune,baseline_bf16,bf16_weights,full,qlora

run: install
	$(BIN)/voxtune serve

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
