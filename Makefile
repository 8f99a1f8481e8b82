# resgeom_fast: `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# The CUDA toolkit, found by tools/cuda_home.py (the one description of the discovery, also used by
# setup.py and CMakeLists.txt): $CUDA_HOME, else the toolkit an nvcc wrapper script on PATH execs
# (torch would otherwise guess the wrapper's folder and the link fails), else nvcc's own folder.
CUDA_HOME := $(shell $(PYTHON) tools/cuda_home.py)
ifneq ($(strip $(CUDA_HOME)),)
export CUDA_HOME
endif
export MAX_JOBS ?= 2
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') setup.py pyproject.toml \
	tools/cuda_home.py resgeom_fast/_version.py

.PHONY: all venv build test lint ctest sdist-check demo bench gpu-check clean

all: build

venv: $(VENV)/.deps
$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy scipy ninja \
		scikit-learn matplotlib tqdm pyyaml pytest pytest-benchmark ruff timm build
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation -e .
	$(VPY) -c "import resgeom_fast as rg; print('resgeom_fast built, CUDA kernels:', rg.built_with_cuda())"
	touch $@

test: build lint ctest
	$(VPY) -m pytest tests -q -p no:cacheprovider

# The wheel built from the sdist (CPU kernels): every file the build needs is in the sdist
# (MANIFEST.in); .ci/run runs it once after make test.
sdist-check: $(VENV)/.deps
	rm -rf build-sdist && mkdir -p build-sdist
	$(VPY) -m build --sdist --no-isolation -x -o build-sdist .
	RESGEOM_FAST_FORCE_CPU=1 $(VPY) -m pip wheel -q --no-build-isolation --no-deps -w build-sdist \
		build-sdist/resgeom_fast-*.tar.gz
	cd build-sdist && rm -rf unpacked && mkdir unpacked && $(abspath $(VPY)) -m zipfile -e resgeom_fast-*.whl unpacked \
		&& cd unpacked && $(abspath $(VPY)) -c "import resgeom_fast as rg, torch; \
		q = rg.ops.orthonormalize(torch.randn(2, 30, 4, dtype=torch.float64)); \
		assert rg.__file__.startswith('$(abspath build-sdist)'), rg.__file__; \
		print('wheel from the sdist:', rg.__file__, 'orthonormality error', \
		float((q.transpose(-1, -2) @ q - torch.eye(4, dtype=torch.float64)).abs().max()))"

lint: $(VENV)/.deps
	$(VPY) -m ruff check resgeom_fast tests benchmarks examples tools setup.py

# The same sources as a libtorch library (CMakeLists.txt), CPU kernels, and the C++ tests.
ctest: $(VENV)/.deps
	cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
		$(if $(strip $(CUDA_HOME)),-DCUDAToolkit_ROOT=$(CUDA_HOME))
	cmake --build build-cmake -j $(MAX_JOBS)
	ctest --test-dir build-cmake --output-on-failure

# The main job: train a ResNet and its plain twin on digits, run every analysis, write the report
# (reports/demo/report.md, results.json, figures). A re-run resumes; --fresh starts over.
demo: build
	$(VPY) -m resgeom_fast demo --out reports/demo

bench: build
	$(VPY) -m resgeom_fast bench --json benchmarks/results/latest.json

# One prepared GPU validation run on a GPU machine (benchmarks/gpu/validate.py; its docstring):
# build in place (TORCH_CUDA_ARCH_LIST=9.0), CUDA tests, compute-sanitizer memcheck/racecheck,
# opcheck, GPU benchmarks, each stage with its own budget, 9 minutes in all, everything in one
# folder ($(OUT) if set, else benchmarks/results/gpu_<date>). No venv: the machine's python3.
# Its CPU dry run (validate.py --dry-run) runs in make test (tests/misc/test_gpu_check_dryrun.py).
gpu-check:
	$(PYTHON) benchmarks/gpu/validate.py $(if $(OUT),--out $(OUT)) --budget 540

clean:
	rm -rf build build-cmake *.egg-info resgeom_fast/_C*.so $(VENV)/.built
