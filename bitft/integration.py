"""Let `AutoModelForCausalLM.from_pretrained(DIR)` rebuild a bitft checkpoint (after `import bitft`).

A converted checkpoint's config.json carries `bitft` (λ, SubLN, the converted module names) and a
`quantization_config`: transformers' own `bitnet`/`autobitlinear`/`online` at λ=1, `bitft` below.
Importing bitft registers a quantizer for both methods that, when the config has a `bitft`
record, swaps exactly the recorded modules for bitft's BitLinear (on the meta model, before the
weights load into them). A `bitnet` checkpoint without that record loads as stock transformers
would load it.

Without `import bitft`, stock transformers loads a λ=1 checkpoint as its AutoBitLinear (same
forward); a λ<1 checkpoint it does not know, and it warns and loads the full-precision weights.
"""

from __future__ import annotations

from transformers.quantizers import auto as _auto
from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer
from transformers.utils import is_accelerate_available
from transformers.utils.quantization_config import QuantizationConfigMixin

from bitft.surgery import FORMAT_VERSION, swap_modules


class BitftQuantConfig(QuantizationConfigMixin):
    """`quant_method: bitft`, for checkpoints at λ<1 (stock transformers has no equivalent)."""

    def __init__(self, **kwargs):
        self.quant_method = "bitft"
        self.__dict__.update({k: v for k, v in kwargs.items() if k != "quant_method"})

    def to_dict(self):
        return dict(self.__dict__)


class BitftQuantizer(BitNetHfQuantizer):
    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        # the stock check also warns about "weight unpacking" on CPU, which online BitLinear never does
        if not is_accelerate_available():
            raise ImportError("loading a BitNet checkpoint needs accelerate: pip install accelerate")

    def get_load_operations(self):
        return {} if self.quantization_config.quant_method == "bitft" else super().get_load_operations()

    def _process_model_before_weight_loading(self, model, **kwargs):
        meta = getattr(model.config, "bitft", None)
        if not meta:
            if self.quantization_config.quant_method == "bitft":
                raise ValueError("config.json says quant_method 'bitft' but has no 'bitft' record: the checkpoint is damaged")
            return super()._process_model_before_weight_loading(model, **kwargs)
        if meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"checkpoint written by a newer bitft (format {meta['version']}); upgrade bitft")
        # modules the model lacks are skipped: from_pretrained(..., num_hidden_layers=k) truncates
        present = {n for n, _ in model.named_modules()}
        names = [n for n in meta["modules"] if n in present]
        if not names:
            raise ValueError(f"none of the {len(meta['modules'])} converted modules recorded in config.json exist in the model")
        swap_modules(model, names, meta["lambda"], meta["subln"], meta["rms_norm_eps"])

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register() -> None:
    """Install the quantizer for `bitft` (transformers' public registry) and `bitnet` (idempotent)."""
    if "bitft" not in _auto.AUTO_QUANTIZER_MAPPING:
        _auto.register_quantization_config("bitft")(BitftQuantConfig)
        _auto.register_quantizer("bitft")(BitftQuantizer)
    # `bitnet` is transformers' own method: register_quantizer refuses a name it has, so replace it directly
    _auto.AUTO_QUANTIZER_MAPPING["bitnet"] = BitftQuantizer
