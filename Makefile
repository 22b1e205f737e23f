# nervedet: set-up, tests and the demo. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test demo lint bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the release that lies on this workplace's disk (a CUDA build that also runs on the CPU);
# pip's constraint file caps torch at the same release.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check nervedet tests scripts

# The main job on a synthetic 2 x 2 mm slide with the bundled weights, then its accuracy against the truth.
demo: $(STAMP)
	$(VENV)/bin/nervedet synth demo_out/slides --seed 1 --width-mm 2 --height-mm 2
	$(VENV)/bin/nervedet infer demo_out/slides/synth_1.svs --out demo_out/results
	$(VENV)/bin/nervedet evaluate --pred demo_out/results --truth demo_out/slides --out demo_out/evaluate.json
	@echo "QuPath: open demo_out/slides/synth_1.svs, then File > Import objects: demo_out/results/synth_1/synth_1.geojson"

# Speed and memory, side by side in one run (not part of the tests): see BENCHMARKS.md.
bench: $(STAMP)
	$(PY) scripts/benchmark.py --json runs/benchmark/benchmark.json

bench-quick: $(STAMP)
	$(PY) scripts/benchmark.py --quick --json runs/benchmark/benchmark-quick.json

clean:
	rm -rf $(VENV) build *.egg-info
