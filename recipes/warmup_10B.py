"""accelerate launch recipes/warmup_10B.py --config configs/warmup_10B.yaml

Continued pre-training of a BitNet b1.58 model with λ warmup: the recipe behind
HF1BitLLM/Llama3-8B-1.58-Linear-10B-tokens. Flags override the YAML's keys (Hugging Face
TrainingArguments names: --output_dir, --max_steps, --save_steps, ...); unknown keys are errors.

The 2-core CPU demo (SmolLM2-135M on the shared text, a few minutes):

    accelerate launch --cpu --num_processes 1 recipes/warmup_10B.py --config configs/demo/warmup.yaml

    source ─▶ convert (BitLinear, λ=0) ─▶ Trainer: every optimizer step λ = schedule(step)
           ─▶ checkpoints (marked complete) ─▶ held-out λ=1 perplexity ─▶ converted checkpoint

Relaunching the same command after a crash or kill -9 resumes from the newest complete checkpoint
(step, λ, data position, optimizer, RNG). A NaN/inf loss stops the run with its state saved.
"""

from __future__ import annotations

import json
import math
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # BitNet layers compile badly on CPU; see FACTS

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

import bitft
from bitft.checkpoint import BitftError, load_source
from bitft.data import DataArguments, DataError, build_datasets
from bitft.schedule import LambdaArguments, LambdaCallback
from bitft.training import (BitftTrainerMixin, CheckpointMarker, ConfigError, ModelArguments, NonFiniteLossError,
                            ThroughputCallback, install_progress, logger, model_source, parse_config,
                            start_run, train_and_evaluate)


class WarmupTrainer(BitftTrainerMixin, Trainer):
    """The Trainer, with bitft's NaN/inf guard and λ / tokens in its logs."""


def load_model(model_args: ModelArguments, lam: float):
    """(model, tokenizer): a bitft checkpoint as saved, anything else converted on the fly at λ."""
    dtype = getattr(torch, model_args.torch_dtype)
    model, tokenizer = load_source(model_source(model_args.model_name_or_path), dtype=dtype)
    if getattr(model, "hf_quantizer", None) is None and getattr(model, "is_quantized", False):
        model.is_quantized = False  # a GGUF comes out dequantized; the Trainer would refuse a "quantized" model
    if getattr(model.config, "bitft", None):
        logger.info("loaded bitft checkpoint %s (%d BitLinear layers)", model_args.model_name_or_path,
                    len(model.config.bitft["modules"]))
    else:
        bitft.convert_model(model, lam=lam, targets=model_args.targets, exclude=model_args.exclude, subln=model_args.subln)
        logger.info("converted %s on the fly: %d BitLinear layers", model_args.model_name_or_path,
                    len(model.config.bitft["modules"]))
    if model_args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    if tokenizer is None:
        raise ConfigError(f"{model_args.model_name_or_path} has no tokenizer: set tokenizer_name_or_path")
    return model, tokenizer


def main(argv=None) -> dict:
    # 1. configuration: YAML, then flags
    model_args, data_args, lambda_args, args = parse_config(
        (ModelArguments, DataArguments, LambdaArguments, TrainingArguments), argv)
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a bitft checkpoint, hub id, model folder or .gguf)")
    resume = start_run(args)
    schedule = lambda_args.schedule()

    # 2. model: BitLinear everywhere the decoder has a linear layer, λ from the schedule
    model, tokenizer = load_model(model_args, lam=schedule(0))

    # 3. data: packed blocks of block_size tokens, a held-out eval slice, a seeded order
    train_set, eval_set = build_datasets(
        tokenizer, data_args.dataset, block_size=data_args.block_size, eval_blocks=data_args.eval_blocks,
        seed=args.data_seed if args.data_seed is not None else args.seed, dataset_config=data_args.dataset_config,
        split=data_args.dataset_split, text_field=data_args.text_field, shuffle_buffer=data_args.shuffle_buffer,
        max_documents=data_args.max_documents)
    tokens_per_step = data_args.block_size * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info("optimizer step = %d tokens (block %d × micro-batch %d × accumulation %d × %d processes); %s",
                tokens_per_step, data_args.block_size, args.per_device_train_batch_size,
                args.gradient_accumulation_steps, args.world_size, schedule.describe())

    # 4. the Trainer, with the λ schedule, throughput and checkpoint-complete callbacks
    lambda_cb = LambdaCallback(schedule)
    trainer = WarmupTrainer(model=model, args=args, train_dataset=train_set,
                            eval_dataset=eval_set if len(eval_set) else None, data_collator=default_data_collator,
                            processing_class=tokenizer,
                            callbacks=[lambda_cb, ThroughputCallback(tokens_per_step), CheckpointMarker()])
    install_progress(trainer, tokens_per_step, lambda_cb)
    results = {"tokens_per_step": tokens_per_step, "world_size": args.world_size,
               "engine": trainer.accelerator.distributed_type.value}

    # 5. train (resuming where a killed run stopped); evaluations run at λ=1, the first one
    #    before the first step on a fresh start
    trainer.eval_lambda = 1.0
    results.update(train_and_evaluate(trainer, resume, evaluate=bool(eval_set)))
    results["tokens"] = results["steps"] * tokens_per_step
    if "after" in results:
        results["after"]["eval_perplexity"] = math.exp(results["after"]["eval_loss"])

    # 6. the final converted checkpoint (loads with from_pretrained)
    bitft.set_lambda(trainer.model, schedule(trainer.state.global_step))
    trainer.save_model(args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "warmup_results.json"), "w") as f:
            json.dump(results, f, indent=1)
        report(results)
    return results


def report(r: dict) -> None:
    def ppl(key):
        return f"{r[key]['eval_perplexity']:.4g}" if key in r else "-"

    print(f"\nsteps {r['steps']}  tokens {r['tokens']:,}  minutes {r['train_minutes']}  "
          f"final λ {r['lambda_final']}  processes {r['world_size']} ({r['engine']})\n"
          f"held-out λ=1 perplexity: before {ppl('before')}  after {ppl('after')}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as e:
        print(f"warmup_10B: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except (ConfigError, DataError, BitftError) as e:
        print(f"warmup_10B: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
