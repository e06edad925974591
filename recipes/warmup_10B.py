"""accelerate launch recipes/warmup_10B.py --config configs/warmup_10B.yaml

Continued pre-training of a BitNet b1.58 model with λ warmup: the recipe behind
HF1BitLLM/Llama3-8B-1.58-Linear-10B-tokens. Flags override the YAML's keys (Hugging Face
TrainingArguments names: --output_dir, --max_steps, --save_steps, ...); unknown keys are errors.

The 2-core CPU demo (SmolLM2-135M on the text shipped with bitft, a few minutes):

    accelerate launch --cpu --num_processes 1 recipes/warmup_10B.py --config configs/demo/warmup.yaml

    source ─▶ convert (BitLinear, λ=0) ─▶ Trainer: every optimizer step λ = schedule(step)
           ─▶ checkpoints (marked complete) ─▶ held-out λ=1 perplexity ─▶ converted checkpoint
    [distill_alpha / attention_distill_weight > 0: the loss also distills the full-precision teacher;
     teacher_cache: its top-k precomputed by `bitft teacher-cache --config` of this recipe, no teacher runs]

Relaunching the same command after a crash or kill -9 resumes from the newest complete checkpoint
(step, λ, data position, optimizer, RNG). A NaN/inf loss stops the run with its state saved.
SIGTERM / SIGUSR1 (`preempt_signals`) stop it after the current optimizer step with a checkpoint
and exit status 75 ("requeue"); a relaunch with other tokens per step, model or data is refused.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # BitNet layers compile badly on CPU

import torch
from transformers import TrainingArguments, default_data_collator

import bitft
from bitft.config import (BlockwiseArguments, ClusterArguments, DistillArguments, LambdaArguments, ModelArguments,
                          PretrainDataArguments, parse_config)
from bitft.data.pretrain import build_datasets
from bitft.errors import ConfigError, run_main
from bitft.train.blockwise import calibration_ids, check_blockwise, phase_complete, reconstruct
from bitft.train.callbacks import LambdaCallback, ThroughputCallback, install_progress
from bitft.train.distill import build_teacher
from bitft.train.model import load_model
from bitft.ternary_init import apply_ternary_init, parse_rule
from bitft.train.preempt import PreemptionCallback
from bitft.train.resume import CheckpointMarker, check_run
from bitft.train.teacher_cache import CachedBlocks, data_identity
from bitft.train.trainer import BitftTrainer, finish_run, logger, start_run, train_and_evaluate


def main(argv=None) -> dict:
    # 1. configuration: YAML, then flags
    model_args, data_args, lambda_args, distill_args, block_args, cluster_args, args = parse_config(
        (ModelArguments, PretrainDataArguments, LambdaArguments, DistillArguments, BlockwiseArguments, ClusterArguments,
         TrainingArguments), argv)
    if model_args.use_peft:
        raise ConfigError("use_peft: the warmup trains the master weights; LoRA is for the SFT and DPO recipes")
    if args.include_num_input_tokens_seen == "no":  # the Trainer counts tokens (all processes, resumes included)
        args.include_num_input_tokens_seen = "all"
    schedule = lambda_args.schedule()
    if block_args.active:
        check_blockwise(schedule(0), model_args.use_peft, args.world_size, str(parse_rule(model_args.ternary_init)),
                        phase_complete(args.output_dir))
    resume = start_run(args)
    preempt = PreemptionCallback(cluster_args.preempt_signals) if cluster_args.preempt_signals else None

    # 2. model: BitLinear everywhere the decoder has a linear layer, λ from the schedule; the teacher
    #    (distillation only): by default the model as loaded, full precision, frozen
    model, tokenizer, _ = load_model(model_args, lam=schedule(0))
    teacher = build_teacher(model, tokenizer, distill_args.teacher_name_or_path, distill_args.torch_teacher_dtype()) \
        if distill_args.active and not distill_args.teacher_cache else None

    # 3. data: packed blocks of block_size tokens, a held-out eval slice, a seeded order
    train_set, eval_set = build_datasets(
        tokenizer, data_args.dataset, block_size=data_args.block_size, eval_blocks=data_args.eval_blocks,
        seed=args.data_seed if args.data_seed is not None else args.seed, dataset_config=data_args.dataset_config,
        split=data_args.dataset_split, text_field=data_args.text_field, shuffle_buffer=data_args.shuffle_buffer,
        max_documents=data_args.max_documents, eval_only=bool(distill_args.teacher_cache))
    tokens_per_step = data_args.block_size * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    shape = (f"block {data_args.block_size} × micro-batch {args.per_device_train_batch_size} × accumulation "
             f"{args.gradient_accumulation_steps} × {args.world_size} processes")
    logger.info("optimizer step = %d tokens (%s); %s", tokens_per_step, shape, schedule.describe())
    run = {"tokens_per_step": tokens_per_step, "shape": shape,
           "model": f"{model.config.model_type}, {sum(p.numel() for p in model.parameters()):,} parameters",
           "data": data_identity(data_args, args.data_seed if args.data_seed is not None else args.seed)}
    if distill_args.teacher_cache:  # the same blocks, with the teacher's top-k: no teacher in this run
        train_set = CachedBlocks(distill_args.teacher_cache, distill_args.distill_top_k)
        train_set.check(block_size=data_args.block_size, temperature=distill_args.distill_temperature,
                        data=run["data"], tokenizer=tokenizer)
        args.remove_unused_columns = False  # teacher_logp / teacher_ids reach compute_loss
    run["ternary_init"] = ternary_start(model, model_args, schedule(0), resume, train_set)  # after the teacher's copy
    if resume is not None:
        check_run(resume, run, cluster_args.allow_batch_change)
    blockwise = None
    if block_args.active and resume is None:  # a resumed end-to-end phase loads the block-trained weights
        calibration = None if phase_complete(args.output_dir) else \
            calibration_ids(train_set, block_args.block_calibration_blocks + block_args.block_heldout_blocks)
        blockwise = reconstruct(model, calibration, block_args, args, preempt)

    # 4. the Trainer, with the λ schedule, throughput and checkpoint-complete callbacks; evaluations at λ=1
    lambda_cb = LambdaCallback(schedule)
    trainer = BitftTrainer(model=model, args=args, train_dataset=train_set,
                           eval_dataset=eval_set if len(eval_set) else None, data_collator=default_data_collator,
                           processing_class=tokenizer,
                           callbacks=[lambda_cb, ThroughputCallback(), CheckpointMarker(run), *([preempt] if preempt else [])])
    trainer.eval_lambda = 1.0
    trainer.full_precision_lr_scale = model_args.full_precision_lr_scale
    if distill_args.active:
        trainer.setup_distillation(teacher, distill_args)
    install_progress(trainer, lambda_cb)
    results = {"tokens_per_step": tokens_per_step, "world_size": args.world_size,
               "engine": trainer.accelerator.distributed_type.value,
               "distill": {"alpha": distill_args.distill_alpha, "temperature": distill_args.distill_temperature,
                           "attention_weight": distill_args.attention_distill_weight,
                           "hidden_weight": distill_args.hidden_distill_weight,
                           "teacher": distill_args.teacher_name_or_path or "the starting model, full precision",
                           "top_k": distill_args.distill_top_k, "teacher_cache": distill_args.teacher_cache}
               if distill_args.active else None}

    # 5. train (resuming where a killed run stopped), held-out figures before (fresh start) and after
    if blockwise is not None and args.max_steps == 0:  # the block phase alone (the Trainer reads 0 as "use epochs")
        results.update(steps=0, train_minutes=0.0, lambda_final=1.0)
        if eval_set:
            results["after"] = trainer.evaluate()
    else:
        results.update(train_and_evaluate(trainer, resume, evaluate=bool(eval_set)))
    results["tokens"] = results["steps"] * tokens_per_step
    if blockwise is not None:  # the phase's minutes (calibration streams included) and each block's held-out error
        results["blockwise"] = {k: blockwise[k] for k in ("minutes_this_launch", "block_train_minutes")}
        results["blockwise"]["blocks"] = [{k: b[k] for k in ("block", "steps", "held_out_before", "held_out_after")}
                                          for b in blockwise["blocks"]]
        results["total_minutes"] = round(results["train_minutes"] + blockwise["minutes_this_launch"], 2)
    if "after" in results:
        results["after"]["eval_perplexity"] = math.exp(results["after"]["eval_loss"])

    # 6. the final converted checkpoint (loads with from_pretrained)
    bitft.set_lambda(trainer.model, schedule(trainer.state.global_step))
    return finish_run(trainer, results, "warmup", report)


def ternary_start(model, model_args, first_lambda: float, resume, train_set) -> str:
    """The master weights rewritten by bitft.ternary_init (a fresh start at λ=1 only); the rule's name.
    gptq calibrates on the first ternary_init_blocks training blocks."""
    rule = parse_rule(model_args.ternary_init)
    if rule != "absmean" and first_lambda < 1:
        raise ConfigError(f"ternary_init {rule}: rewrites the master weights for a run at λ=1 from its first step, "
                          f"but this schedule starts at λ={first_lambda:g} (set lambda_warmup_steps: 0)")
    if rule != "absmean" and resume is None:  # a resumed run loads its checkpoint's weights
        items = [torch.as_tensor(x["input_ids"]) for x in itertools.islice(iter(train_set), model_args.ternary_init_blocks)] \
            if rule == "gptq" else []
        blocks = torch.stack(items) if items else None  # none: apply_ternary_init says gptq needs them
        done = apply_ternary_init(model, rule, blocks)
        logger.info("ternary_init %s: %d layers rewritten, scale %.3f× their absmean on average",
                    rule, done["layers"], done["mean_gamma"])
    return str(rule)


def report(r: dict) -> None:
    def ppl(key):
        return f"{r[key]['eval_perplexity']:.4g}" if key in r else "-"

    if "blockwise" in r:
        b = r["blockwise"]
        print(f"\nblock-wise phase: {len(b['blocks'])} blocks, {sum(x['steps'] for x in b['blocks'])} steps, "
              f"{b['minutes_this_launch']} min; end-to-end and block phases together {r['total_minutes']} min")
    print(f"\nsteps {r['steps']}  tokens {r['tokens']:,}  minutes {r['train_minutes']}  "
          f"final λ {r['lambda_final']}  processes {r['world_size']} ({r['engine']})\n"
          f"held-out λ=1 perplexity: before {ppl('before')}  after {ppl('after')}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, "warmup_10B", exit_code=2))
