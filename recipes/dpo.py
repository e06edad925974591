"""accelerate launch recipes/dpo.py --config configs/dpo.yaml

Direct preference optimization of a BitNet b1.58 model (usually the SFT output) with TRL's
DPOTrainer, BitLinear at λ=1 throughout: the third stage of BitNet b1.58 2B4T. Keys are the fields
of ModelArguments (TRL's ModelConfig: model, dtype, LoRA), PreferenceDataArguments and TRL's
DPOConfig (bitft.config): flags override the YAML (--output_dir, --max_steps, --beta, ...), unknown keys
are errors.

The 2-core CPU demo (SmolLM2-135M after the SFT demo, a few minutes):

    accelerate launch --cpu --num_processes 1 recipes/dpo.py --config configs/demo/dpo.yaml

    bitft checkpoint ─▶ λ=1 policy ──────────────┬─▶ DPOTrainer ─▶ checkpoints ─▶ held-out margin/accuracy
                     └▶ reference: frozen copy ───┘   (with LoRA: the policy with its adapters disabled)

The reference is passed to TRL explicitly: left to itself, TRL rebuilds it from the checkpoint's
path as a plain model without BitLinear layers. With use_peft (or precompute_ref_log_probs) no
second copy of the model is kept. Relaunching the same command resumes from the newest complete
checkpoint; a NaN/inf loss stops the run with its state saved.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # BitNet layers compile badly on CPU

from trl.data_utils import is_conversational

import bitft
from bitft.config import BitDPOConfig, ClusterArguments, ModelArguments, PreferenceDataArguments, parse_config
from bitft.data.chat import apply_template_source, build_datasets, require_chat_template
from bitft.errors import run_main
from bitft.surgery import bit_linears
from bitft.train.callbacks import ternary_lambda
from bitft.train.model import frozen_copy, load_model, lora_config
from bitft.train.preempt import PreemptionCallback
from bitft.train.resume import CheckpointMarker, check_run, run_record
from bitft.train.trainer import BitDPOTrainer, finish_run, logger, start_run, train_and_evaluate

KEYS = ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_rewards/chosen", "eval_rewards/rejected")


def main(argv=None) -> dict:
    # 1. configuration: YAML, then flags (TRL's parser)
    model_args, data_args, cluster_args, args = parse_config(
        (ModelArguments, PreferenceDataArguments, ClusterArguments, BitDPOConfig), argv)
    resume = start_run(args)
    preempt = PreemptionCallback(cluster_args.preempt_signals) if cluster_args.preempt_signals else None

    # 2. policy at λ=1; data (a held-out slice); the chat template where the pairs are conversations
    model, tokenizer, is_checkpoint = load_model(model_args, lam=1.0)
    apply_template_source(tokenizer, data_args.chat_template_path)
    peft_config = lora_config(model_args, model, is_checkpoint)
    train_set, eval_set = build_datasets(data_args, "preference", seed=args.data_seed if args.data_seed is not None else args.seed)
    if is_conversational(train_set[0]):
        require_chat_template(tokenizer, model_args.model_name_or_path)
    logger.info("DPO on %d pairs (%d held out), β=%g, %s", len(train_set), len(eval_set) if eval_set else 0, args.beta,
                "LoRA" if peft_config else "full fine-tuning")

    # 3. the reference: the policy as it starts, frozen, BitLinear included. With LoRA, TRL disables the
    #    adapters instead (same weights, no copy); with precompute_ref_log_probs it scores the data once
    #    with the untouched policy before the first step.
    ref_model = None if peft_config is not None or args.precompute_ref_log_probs else frozen_copy(model)

    run = run_record(args, model, data_args)  # checked at resume, kept in each checkpoint's marker
    if resume is not None:
        check_run(resume, run, cluster_args.allow_batch_change)
    trainer = BitDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=[ternary_lambda(), CheckpointMarker(run), *([preempt] if preempt else [])])
    trainer.eval_lambda = 1.0
    trainer.full_precision_lr_scale = model_args.full_precision_lr_scale
    results = {"stage": "dpo", "lora": peft_config is not None, "beta": args.beta, "world_size": args.world_size,
               "reference": "adapters disabled" if peft_config is not None else
               ("precomputed log-probs" if ref_model is None else "frozen copy"),
               "train_pairs": len(train_set), "eval_pairs": len(eval_set) if eval_set else 0}
    results.update(reference_check(trainer))

    # 4. train (resuming where a killed run stopped), held-out metrics before (fresh start) and after; save
    results.update(train_and_evaluate(trainer, resume, evaluate=eval_set is not None))
    return finish_run(trainer, results, "dpo", report)


def reference_check(trainer) -> dict:
    """What the reference is made of: BitLinear layers at λ=1 and nothing trainable in it."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
        trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    else:  # LoRA: the policy's base weights (adapters disabled) are the reference; they must be frozen
        ref = policy
        trainable = sum(p.numel() for n, p in policy.named_parameters() if p.requires_grad and "lora_" not in n)
    return {"reference_bitlinear_layers": len(bit_linears(ref)), "reference_lambda": bitft.get_lambda(ref),
            "reference_trainable_params": trainable, "reference_is_policy_object": ref is policy,
            "policy_trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad)}


def report(r: dict) -> None:
    print(f"\nDPO steps {r['steps']}  minutes {r['train_minutes']}  λ {r['lambda_final']}  LoRA {r['lora']}  "
          f"β {r['beta']}  reference: {r['reference']}", flush=True)
    rows = [k for k in ("before", "after") if r.get(k)]
    if rows:
        print("held-out pairs      " + "  ".join(f"{k.split('/')[-1][:11]:>11}" for k in KEYS), flush=True)
        for k in rows:
            print(f"{k:<19} " + "  ".join(f"{r[k].get(key, float('nan')):>11.4f}" for key in KEYS), flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, "dpo", exit_code=2))
