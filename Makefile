# Quickstart targets. Each creates .venv/ on first use and installs everything it needs.
#   make demo   set up, then run the main job on the bundled default input
#   make test   set up, then run the whole test suite with the native extension, then with
#               SCALSELECT_FORCE_FALLBACK=1 (the pure-Python kernels every native call falls back to;
#               modules that never reach a kernel are left out of that pass, see tests/conftest.py),
#               then the selection tests once more under another CPU's BLAS kernels
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.scalselect-installed
# torch is pinned so pip takes the CPU build from this machine's disk instead of a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scalselect demo --out demo-out

# The third pass reruns the tests that pin selections under another CPU's BLAS kernels (Prescott's,
# understood by every x86-64 OpenBLAS), so a test whose result depends on the machine cannot land.
REPRO_TESTS := tests/test_subspace_pins.py tests/test_selection.py tests/test_scoring.py tests/test_stability.py \
               tests/test_distributed.py tests/test_subspace.py tests/test_subspace_stream.py tests/test_native.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider
	SCALSELECT_FORCE_FALLBACK=1 $(PY) -m pytest -q -p no:cacheprovider
	env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Prescott $(PY) -m pytest -q -p no:cacheprovider $(REPRO_TESTS)

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf build *.egg-info scalselect_fast/*.so demo-out
