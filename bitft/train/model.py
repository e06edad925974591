"""The model a recipe trains: one loader for the warmup, SFT and DPO recipes, LoRA, the DPO reference.

    model_name_or_path ─▶ bitft.sources.load_model ─▶ a bitft checkpoint at the run's starting λ,
                          or any other model converted on the fly (targets / exclude / subln)
    use_peft           ─▶ TRL's get_peft_config (ModelConfig keys), on every BitLinear by default
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from bitft.config import ModelArguments
from bitft.errors import ConfigError
from bitft.sources import load_model as load_source

logger = logging.getLogger("bitft")


def load_model(args: ModelArguments, lam: float):
    """(model at λ=LAM, tokenizer, is_bitft_checkpoint) for a training run."""
    if not args.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a bitft checkpoint, hub id, model folder, .gguf or smollm2)")
    source = args.model_name_or_path
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())  # LoRA adapters record it as their base
    loaded = load_source(source, dtype=args.torch_dtype(), lam=lam, convert=args.conversion(),
                         tokenizer=args.tokenizer_name_or_path)
    model, meta = loaded.model, loaded.model.config.bitft
    is_checkpoint = not loaded.converted
    if is_checkpoint and meta["lambda"] != lam:
        logger.warning("%s was saved at λ=%g; this run starts at λ=%g", args.model_name_or_path, meta["lambda"], lam)
    logger.info("%s: %s", args.model_name_or_path, loaded.what)
    if loaded.tokenizer is None:
        raise ConfigError(f"{args.model_name_or_path} has no tokenizer: set tokenizer_name_or_path")
    model.config.use_cache = False
    return model, loaded.tokenizer, is_checkpoint


def lora_config(args: ModelArguments, model, is_checkpoint: bool):
    """peft LoraConfig from the ModelConfig keys (TRL's get_peft_config), on every BitLinear unless
    lora_target_modules says otherwise; None without use_peft."""
    from trl import get_peft_config

    if not args.use_peft:
        return None
    if not is_checkpoint:
        raise ConfigError("use_peft needs a converted checkpoint folder as model_name_or_path (the adapters name it as "
                          "their base, and `bitft export --merge-lora` merges into it): run `bitft convert` or warmup first")
    if not args.lora_target_modules:
        args.lora_target_modules = sorted({n.rsplit(".", 1)[-1] for n in model.config.bitft["modules"]})
    return get_peft_config(args)


def frozen_copy(model):
    """The DPO reference: the policy as it is now, frozen, BitLinear and λ included."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()
