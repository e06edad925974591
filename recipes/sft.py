"""accelerate launch recipes/sft.py --config configs/sft.yaml

Supervised fine-tuning of a BitNet b1.58 model (a `bitft convert` or warmup output) on chat data
with TRL's SFTTrainer, BitLinear at λ=1 throughout: the second stage of BitNet b1.58 2B4T.
Keys are the fields of ModelArguments (TRL's ModelConfig: model, dtype, LoRA), ChatDataArguments and
TRL's SFTConfig (bitft.config): flags override the YAML (--output_dir, --max_steps, ...), unknown keys
are errors.

The 2-core CPU demo (SmolLM2-135M after the warmup demo, a few minutes):

    accelerate launch --cpu --num_processes 1 recipes/sft.py --config configs/demo/sft.yaml

    bitft checkpoint ─▶ λ=1 policy [+ LoRA] ─▶ chat rows (template from the tokenizer) ─▶ SFTTrainer
                     ─▶ checkpoints (marked complete) ─▶ held-out loss before/after ─▶ checkpoint (or adapters)

Relaunching the same command resumes from the newest complete checkpoint. A NaN/inf loss stops
the run with its state saved. With use_peft the output folder holds adapters; `bitft export
--packed --merge-lora` merges them into the master weights and re-ternarizes.
"""

from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # BitNet layers compile badly on CPU

from bitft.config import BitSFTConfig, ChatDataArguments, ClusterArguments, DistillArguments, ModelArguments, parse_config
from bitft.data.chat import apply_template_source, build_datasets, require_chat_template, resolve_assistant_only
from bitft.errors import ConfigError, run_main
from bitft.train.callbacks import ternary_lambda
from bitft.train.distill import build_teacher
from bitft.train.model import load_model, lora_config
from bitft.train.preempt import PreemptionCallback
from bitft.train.resume import CheckpointMarker, check_run, run_record
from bitft.train.trainer import BitSFTTrainer, finish_run, logger, merged_evaluate, start_run, train_and_evaluate


def main(argv=None) -> dict:
    # 1. configuration: YAML, then flags (TRL's parser)
    model_args, data_args, distill_args, cluster_args, args = parse_config(
        (ModelArguments, ChatDataArguments, DistillArguments, ClusterArguments, BitSFTConfig), argv)
    if distill_args.teacher_cache:
        raise ConfigError("teacher_cache: `bitft teacher-cache` caches the warmup recipe's blocks; SFT distills "
                          "from a live teacher (distill_top_k works here)")
    resume = start_run(args)
    preempt = PreemptionCallback(cluster_args.preempt_signals) if cluster_args.preempt_signals else None

    # 2. model at λ=1 and its chat template
    model, tokenizer, is_checkpoint = load_model(model_args, lam=1.0)
    teacher = build_teacher(model, tokenizer, distill_args.teacher_name_or_path,
                            distill_args.torch_teacher_dtype()) if distill_args.active else None
    apply_template_source(tokenizer, args.chat_template_path)
    args.chat_template_path = None  # applied above: TRL would also clone tokens from a tokenizer folder
    require_chat_template(tokenizer, model_args.model_name_or_path)
    peft_config = lora_config(model_args, model, is_checkpoint)

    # 3. data: chat rows, a held-out slice, assistant-only loss where the template allows it
    train_set, eval_set = build_datasets(data_args, "chat", seed=args.data_seed if args.data_seed is not None else args.seed)
    args.assistant_only_loss, train_set, eval_set, how = resolve_assistant_only(
        tokenizer, train_set, eval_set, args.assistant_only_loss, data_args.assistant_only_fallback)
    logger.info("SFT on %d conversations (%d held out); %s", len(train_set), len(eval_set) if eval_set else 0, how)

    # 4. the trainer: λ held at 1, checkpoints marked complete (with the run's shape), preemption signals
    run = run_record(args, model, data_args)
    if resume is not None:
        check_run(resume, run, cluster_args.allow_batch_change)
    trainer = BitSFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=[ternary_lambda(), CheckpointMarker(run), *([preempt] if preempt else [])])
    trainer.eval_lambda = 1.0
    trainer.full_precision_lr_scale = model_args.full_precision_lr_scale
    if teacher is not None:  # distillation on the completion tokens the SFT loss uses
        trainer.setup_distillation(teacher, distill_args)
    results = {"stage": "sft", "loss_on": how, "lora": peft_config is not None, "world_size": args.world_size,
               "train_rows": len(train_set), "eval_rows": len(eval_set) if eval_set else 0}

    # 5. train (resuming where a killed run stopped), held-out loss before (fresh start) and after; save
    results.update(train_and_evaluate(trainer, resume, evaluate=eval_set is not None))
    if eval_set is not None and peft_config is not None:
        results["after_merged"] = merged_evaluate(trainer)  # what `bitft export --merge-lora` will give
    return finish_run(trainer, results, "sft", report)


def report(r: dict) -> None:
    def loss(key):
        return f"{r[key]['eval_loss']:.4f} (ppl {math.exp(r[key]['eval_loss']):.4g})" if r.get(key) else "-"

    line = f"held-out loss: before {loss('before')}  after {loss('after')}"
    if r.get("after_merged"):
        line += f"  after LoRA merge + re-ternarize {loss('after_merged')}"
    print(f"\nSFT steps {r['steps']}  minutes {r['train_minutes']}  λ {r['lambda_final']}  LoRA {r['lora']}  "
          f"({r['loss_on']})\n{line}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, "sft", exit_code=2))
