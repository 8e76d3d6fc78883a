# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# fbgemm-gpu build: the CUDA one where a GPU is visible, else the CPU one (override: VARIANT=cpu|cuda)
VARIANT ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP   := $(VENV)/.installed-$(VARIANT)
DEMO    ?= outputs/demo

.PHONY: install demo test test-quick bench clean

install: $(STAMP)

# torch, fbgemm-gpu and torchrec must match exactly (DESIGN: pinned matrix); torchrec goes in
# with --no-deps so that its fbgemm-gpu requirement cannot replace the build chosen above.
# setup.py compiles the CPU kernels against that torch: --no-build-isolation, so that the build
# uses it instead of downloading another.
$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 "setuptools>=64" wheel ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[$(VARIANT),test]"
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	touch $@

demo: install
	$(BIN)/mdaf demo --out $(DEMO)

# the tests marked slurm need a live Slurm (sudo tools/slurm_local.sh up; .ci/run starts one):
# without it they skip, each saying why
test: install
	$(BIN)/python -m pytest -q tests

# without the slow end-to-end launches of several processes (pytest marker `slow`)
test-quick: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) outputs
