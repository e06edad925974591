"""Exports of a λ=1 bitft checkpoint: transformers' packed BitNet format, and GGUF for llama.cpp."""
