# wanrt: two commands on a fresh machine
#   make serve   start the API on port 8189 (tiny built-in model when no weights are given)
#   make test    install everything and run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
MODEL ?= tiny

.PHONY: install redis chromium serve generate test bench doctor

# CPU machines take torch 2.13.0 (a CPU build); a machine that already has torch (GPU images) keeps its own.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"

serve: install
	$(PYTHON) -m wanrt.cli serve --model $(MODEL)

generate: install
	$(PYTHON) -m wanrt.cli generate --model $(MODEL) --image tests/assets/first_frame.png --prompt "a cat turning its head slowly" --out out.mp4

# The tests start their own redis-server on a free port and drive Debian's chromium (no browser download):
# install them from the system package manager when missing.
redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: install redis chromium
	$(PYTHON) -m pytest -q tests

bench: install redis
	$(PYTHON) benchmarks/flops.py
	$(PYTHON) benchmarks/bench_runtime.py --model $(MODEL)
	$(PYTHON) benchmarks/bench_fp8_guard.py --model $(MODEL)
	$(PYTHON) benchmarks/bench_reliability.py

doctor: install
	$(PYTHON) -m wanrt.cli doctor
