# Two entry points that set everything up on a fresh machine:
#   make train   - the embedded default run (synthetic data, CPU, 2 processes)
#   make test    - lint, then the whole test suite (what .ci/run calls)
#   make lint    - ruff (undefined names, unused imports/variables, import order) and mypy, zero findings
#   make coverage - the whole suite under coverage, child processes included: line coverage per module
# and one for a GPU machine:
#   make gpu-check - the prepared GPU check: one JSON in under 5 minutes (eagle_dist/cli/bench/gpu.py)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines pin torch to the CPU build; machines with an NVIDIA driver take pip's CUDA torch.
GPU    := $(shell command -v nvidia-smi 2>/dev/null)
CONSTRAINTS ?= $(if $(GPU),,-c constraints-cpu.txt)

# gpu-check installs nothing: GPU machines are often lent for minutes without network access.
# It runs this venv when there is one, else the python3 that holds the machine's CUDA torch.
GPU_PY   ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_JSON ?= runs/gpu-check.json

.PHONY: install train lint test coverage gpu-check

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

# Both configured in pyproject.toml ([tool.ruff], [tool.mypy]) over eagle_dist/ and launch/.
lint: install
	$(VENV)/bin/ruff check eagle_dist launch
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Every Python child (torchrun / accelerate workers, the bench's parts, the CLI subprocesses)
# measures itself too ([tool.coverage.run] patch = subprocess; COVERAGE_PROCESS_START for the
# ones started before); each writes its own .coverage.* here (COVERAGE_FILE, whatever its working
# folder) and `coverage combine` merges them.  Uncovered blocks that are not CUDA-only are named
# in docs/coverage.md.
coverage: install
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(CURDIR)/.coverage COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml \
	    $(PY) -m pytest -q --cov=eagle_dist --cov-config=pyproject.toml --cov-report= $(PYTEST_ARGS)
	COVERAGE_FILE=$(CURDIR)/.coverage $(PY) -m coverage combine -q --append 2>/dev/null || true
	COVERAGE_FILE=$(CURDIR)/.coverage $(PY) -m coverage report --precision 1

gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m eagle_dist.bench gpu --json $(GPU_JSON) $(GPU_ARGS)
