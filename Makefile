# wanrt: two commands on a fresh machine
#   make serve   start the API on port 8189 (tiny built-in model when no weights are given)
#   make test    install everything and run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
MODEL ?= tiny

.PHONY: install redis chromium wrk lint serve generate test bench doctor

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
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)  # root (CI, containers) needs none; anyone else does
redis:
	@command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null)

chromium:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null)

# wrk: bench_api's load generator (compiled, so the client does not starve the server on a small machine)
wrk:
	@command -v wrk >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null)

lint: install
	$(PYTHON) -m ruff check .

test: install redis chromium wrk lint
	$(PYTHON) -m pytest -q tests

bench: install redis
	$(PYTHON) benchmarks/flops.py
	$(PYTHON) benchmarks/bench_runtime.py --model $(MODEL)
	$(PYTHON) benchmarks/bench_fp8_guard.py --model $(MODEL)
	$(PYTHON) benchmarks/bench_reliability.py

doctor: install
	$(PYTHON) -m wanrt.cli doctor

# GPU proof (benchmarks/gpu_proof.py). `make wheelhouse` runs where pip reaches PyPI: wheels/ gets what a CUDA
# host with its own torch (transformers, accelerate, peft, safetensors, pillow, numpy, httpx, nvidia-ml-py...) lacks,
# at the versions installed here unless pinned; the proof installs them offline there, refuses a wheels/ that
# lacks one, and imports wanrt from this checkout's src/ (no wanrt wheel: the code measured is the code here).
# Pinned for the host's torch 2.11, whatever this machine has: torchao 0.18.0 (a release that supports it) and
# nvidia-cudnn-frontend (attn=cudnn_fp8). Checked: wheels/ plus the working tree that travels with it must stay
# under the device's 64 MiB.
WHEELHOUSE_PKGS := diffusers av ftfy wcwidth torchao==0.18.0 nvidia-cudnn-frontend==1.32.0
STEP ?= A
COPY_TO ?= $(OUT)
.PHONY: wheelhouse gpu-proof
wheelhouse:
	rm -rf wheels && mkdir -p wheels
	$(PIP) download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d wheels/ --no-deps $$($(PYTHON) -c "import importlib.metadata as m, sys; \
		i = {d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}; \
		print(' '.join(f'{p}=={i[p]}' if p in i else p for p in sys.argv[1:]))" $(WHEELHOUSE_PKGS))
	@$(PYTHON) -c "import pathlib, subprocess, sys; w = sorted(pathlib.Path('wheels').glob('*.whl')); \
		n = sum(p.stat().st_size for p in w); \
		t = sum(pathlib.Path(f).stat().st_size for f in subprocess.run(['git', 'ls-files', '-z', '-co', '--exclude-standard'], \
			capture_output=True, text=True, check=True).stdout.split('\0') if f and pathlib.Path(f).is_file()); \
		print('\n'.join(f'{p.stat().st_size / 2**20:7.1f} MiB  {p.name}' for p in w)); \
		print(f'wheels/: {n / 2**20:.1f} MiB; with the working tree that travels ({t / 2**20:.1f} MiB): {(n + t) / 2**20:.1f} MiB'); \
		sys.exit('wheels/ and the tree are over the device limit of 64 MiB' if n + t > 64 * 2**20 else 0)"

# One step of the plan (python benchmarks/gpu_proof.py --plan) on the GPU host: make gpu-proof STEP=B. COPY_TO
# (default $OUT, the device's return folder) gets the JSON, table, chart and README copy after every unit.
gpu-proof:
	$(PYTHON) benchmarks/gpu_proof.py --step $(STEP) $(if $(COPY_TO),--copy-to $(COPY_TO))
