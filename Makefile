# Two commands do all set-up on a fresh machine: `make book` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Rebuilt only when the pins or the package's metadata change.
READY  := $(VENV)/.ready
NOTEBOOK_CODE := book solutions exercises

.PHONY: book test test-colab lint colab exercises gpu-check lab clean

$(READY): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	# Build matplotlib's font cache now: its one-time notice would break nbval's comparisons.
	$(BIN)/python -c "import matplotlib.pyplot" 2>/dev/null
	touch $@

book: $(READY)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "Open $(CURDIR)/_build/html/index.html in a browser."

# One thread per process: two test workers, each with its own notebook kernels, on two cores.
# More threads than cores makes torch's CPU kernels wait on each other, many times slower.
test: $(READY) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile --nbval --nbval-current-env \
		--durations=10 -m "not colab" tests book

# Colab simulated: a fresh environment with only Colab's packages, a notebook run end to end
# (about a minute, most of it installing torch). A target of its own; CI runs it too.
test-colab: $(READY)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m colab tests/test_colab.py

lint: $(READY)
	$(BIN)/ruff check src tests benchmarks $(NOTEBOOK_CODE)
	$(BIN)/ruff format --check src tests benchmarks

# The Colab badge and setup cell at the top of every notebook, from _config.yml's repository.
colab: $(READY)
	$(BIN)/python -m transformer_course.colab

exercises: $(READY)
	$(BIN)/transformer-course release

# On a machine with an NVIDIA GPU: the exercises' CUDA cases and every solution notebook, timed.
# Elsewhere it says there is no GPU and succeeds.
gpu-check: $(READY)
	$(BIN)/python -m transformer_course.gpu_check

lab: $(READY)
	$(BIN)/jupyter lab

clean:
	rm -rf _build $(VENV)
