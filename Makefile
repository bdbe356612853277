# Two entry points that set everything up on a fresh machine:
#   make train   - the embedded default run (synthetic data, CPU, 2 processes)
#   make test    - the whole test suite (what .ci/run calls)
# and one for a GPU machine:
#   make gpu-check - the prepared GPU check: one JSON in under 5 minutes (eagle_dist/cli/bench_gpu.py)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines pin torch to the CPU build; machines with an NVIDIA driver take pip's CUDA torch.
GPU    := $(shell command -v nvidia-smi 2>/dev/null)
CONSTRAINTS ?= $(if $(GPU),,-c constraints-cpu.txt)

# gpu-check installs nothing: GPU machines are often lent for minutes without network access.
# It runs this venv when there is one, else the python3 that holds the machine's CUDA torch.
GPU_PY   ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_JSON ?= runs/gpu-check.json

.PHONY: install train test gpu-check

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	# CPU torch + CUDA-linked torchvision: make every process of this venv (the accelerate CLI
	# included) run eagle_dist's torchvision shim first.  See eagle_dist_tvshim.py.
	$(if $(GPU),,echo 'import eagle_dist_tvshim; eagle_dist_tvshim.activate()' > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/eagle_dist_tvshim.pth")
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/accelerate launch launch/train.py $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m eagle_dist.bench gpu --json $(GPU_JSON) $(GPU_ARGS)
