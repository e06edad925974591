"""bitft: turn pretrained Hugging Face causal LMs into BitNet b1.58 (ternary W1.58A8) models."""

from bitft.bitlinear import BitLinear
from bitft.integration import register as _register
from bitft.surgery import convert_model, get_lambda, set_lambda

_register()

__all__ = ["BitLinear", "convert_model", "set_lambda", "get_lambda"]
__version__ = "0.1.0"
