"""The training loop every recipe shares: the Trainer classes, a guarded train(), a run's start and end.

- `BitftTrainerMixin` (first base: `class T(BitftTrainerMixin, Trainer)`; works with TRL's trainers)
  checks every micro-batch loss in every process and raises `NonFiniteLossError` before a NaN/inf
  reaches the weights; `train()` then saves the state of the last good step and re-raises with a
  message naming the step. It adds the `log_extras(state)` of any callback (λ, tokens, tokens/s)
  to the training logs, and runs every evaluation at `eval_lambda` (1: the ternary model) with
  `<prefix>_perplexity` = exp(`<prefix>_loss`). Its checkpoint save marks the checkpoint complete
  before the rotation (save_total_limit) deletes an older one; a full disk while saving becomes
  `DiskFullError` (disk.py).
- `train()`: a non-finite loss saves the last good step; a preemption signal (`preempt.py`)
  becomes `Preempted` (exit 75) once its checkpoint is complete.
- `start_run(args)`: output_dir, logging, wandb, the checkpoint to resume from, the seed.
- `train_and_evaluate(trainer, resume)`: held-out figures before the first step and after the last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints
from trl import DPOTrainer, SFTTrainer

from bitft.errors import ConfigError, NonFiniteLossError
from bitft.files import write_text_atomic
from bitft.export.gguf_vocab_copy import carry_source_tokenizer
from bitft.surgery import get_lambda, set_lambda
from bitft.train.cpu_heap import keep_heap
from bitft.train.disk import disk_full_error
from bitft.train.distill import DistillMixin
from bitft.train.preempt import raise_if_preempted, restore_signals
from bitft.train.zero_resume import prepare_zero_resume
from bitft.train.resume import CheckpointMarker, is_complete, resume_checkpoint, save_checkpoint

logger = logging.getLogger("bitft")

class BitftTrainerMixin:
    """Mix into a Trainer class (first base): non-finite loss guard, callback log extras, eval λ.

    `eval_lambda`: when set (e.g. 1.0), every evaluation runs at that λ and puts the training λ
    back afterwards, so that held-out figures during a λ warmup are those of the ternary model.
    Evaluation logs also get `<prefix>_perplexity` = exp(`<prefix>_loss`).
    """

    eval_lambda: float | None = None
    full_precision_lr_scale: float = 1.0

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with `full_precision_lr_scale` ≠ 1 each of its groups is split in two, the
        parameters that stay full precision getting lr × scale (the LR schedule then scales both alike)."""
        opt = super().create_optimizer(model)
        scale = self.full_precision_lr_scale
        if scale != 1.0 and not getattr(opt, "bitft_split", False):
            ternary = ternary_side(self.model if model is None else model)
            groups = []
            for g in opt.param_groups:
                side = [p for p in g["params"] if id(p) in ternary]
                rest = [p for p in g["params"] if id(p) not in ternary]
                groups += [{**g, "params": side}] if side else []
                groups += [{**g, "params": rest, "lr": g["lr"] * scale}] if rest else []
            opt.param_groups, opt.bitft_split = groups, True
            n = sum(p.numel() for g in groups for p in g["params"] if id(p) not in ternary)
            logger.info("full_precision_lr_scale %g: %s full-precision parameters at lr %.3g", scale, f"{n:,}",
                        self.args.learning_rate * scale)
        return opt

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The Trainer's save, then the completion marker, then the rotation (save_total_limit): an
        older checkpoint is deleted only once the new one is complete. A full disk: `DiskFullError`."""
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
            marker = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointMarker)), None)
            if marker is not None:
                marker.on_save(self.args, self.state, self.control)  # all processes: barrier, mark, barrier
        except Exception as e:
            full = disk_full_error(e, Path(self.args.output_dir), self.state.global_step, self.is_world_process_zero())
            if full is None:
                raise
            raise full from None
        finally:
            self.args.save_total_limit = limit
        if limit and self.args.should_save:
            rotate_checkpoints(output_dir=self._get_output_dir(trial), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def evaluate(self, *args, **kwargs):
        if self.eval_lambda is None:
            return super().evaluate(*args, **kwargs)
        before = get_lambda(self.model)
        set_lambda(self.model, self.eval_lambda)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            set_lambda(self.model, before)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        check = loss.detach().float().reshape(1)
        if self.accelerator.num_processes > 1:
            check = self.accelerator.gather(check)
        if not torch.isfinite(check).all():
            bad = next(v for v in check.tolist() if not math.isfinite(v))
            raise NonFiniteLossError(self.state.global_step + 1, bad)
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs:  # training logs, not evaluation or the final summary
            for cb in self.callback_handler.callbacks:
                if hasattr(cb, "log_extras"):
                    logs.update(cb.log_extras(self.state))
        for key in [k for k in logs if k.startswith("eval") and k.endswith("_loss")]:
            logs[key[:-5] + "_perplexity"] = math.exp(logs[key]) if logs[key] < 700 else float("inf")
            if self.eval_lambda is not None:
                logs[key[:-5] + "_lambda"] = self.eval_lambda
        return super().log(logs, start_time)


def ternary_side(model) -> set[int]:
    """ids of the parameters that become ternary: BitLinear weights, and LoRA adapters (merged into them)."""
    from bitft.surgery import bit_linears

    ids = {id(m.weight) for m in bit_linears(model).values()}
    return ids | {id(p) for n, p in model.named_parameters() if "lora_" in n}


def train(trainer, resume_from_checkpoint=None):
    """trainer.train(), turning a non-finite loss into a saved state and a clear error, and a
    preemption signal into `Preempted` once its checkpoint is complete."""
    if resume_from_checkpoint:
        prepare_zero_resume(trainer, Path(resume_from_checkpoint))  # ZeRO on another world size
    try:
        out = trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
        raise_if_preempted(trainer)
        return out
    except NonFiniteLossError as e:
        step = trainer.state.global_step
        existing = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        if step > 0 and is_complete(existing):
            saved = existing
        else:
            saved = save_checkpoint(trainer)
        lam = next((cb.current for cb in trainer.callback_handler.callbacks if hasattr(cb, "schedule")), None)
        lam_txt = f", λ={lam:g}" if lam is not None else ""
        raise NonFiniteLossError(e.step, e.loss, (
            f"loss is {e.loss} at optimizer step {e.step}{lam_txt}, lr={trainer._get_learning_rate():.3g}: "
            f"training stopped before that step changed the weights. The state after step {step} is in {saved}. "
            "Lower the learning rate or check the data, then relaunch the same command to resume.")) from None
    finally:
        restore_signals(trainer)  # the run may be part of a longer program (tests, ablation scripts)


class BitftTrainer(DistillMixin, BitftTrainerMixin, Trainer):
    """The Trainer (continued pre-training), with bitft's NaN/inf guard, λ / tokens in its logs, distillation."""


class BitSFTTrainer(DistillMixin, BitftTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer, with bitft's NaN/inf guard, λ in its logs, distillation."""


class BitDPOTrainer(BitftTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer, with bitft's NaN/inf guard and λ in its logs."""


def start_run(args) -> Path | None:
    """What every recipe does first: check output_dir, set up logging and wandb, find the checkpoint
    to resume from (the newest complete one unless resume_from_checkpoint says otherwise), seed."""
    from transformers import set_seed

    if not args.output_dir:
        raise ConfigError("output_dir is required")
    setup_logging(args)
    setup_wandb(args)
    if args.use_cpu or not torch.cuda.is_available():
        keep_heap()
    resume = resume_checkpoint(args.output_dir, True if args.resume_from_checkpoint is None else args.resume_from_checkpoint,
                               is_main=args.process_index == 0)
    set_seed(args.seed)
    return resume


def train_and_evaluate(trainer, resume=None, evaluate: bool = True) -> dict:
    """Train (resuming from RESUME) with held-out figures before the first step (on a fresh start,
    through `eval_on_start`: evaluating before train() leaves a DDP model unwrapped) and after."""
    if evaluate and resume is None:
        trainer.args.eval_on_start = True
    if resume is not None:
        logger.info("resuming from %s", resume)
    t0 = time.perf_counter()
    out = train(trainer, resume)
    results = {"steps": trainer.state.global_step, "train_minutes": round((time.perf_counter() - t0) / 60, 2),
               "train_loss": out.training_loss, "lambda_final": get_lambda(trainer.model)}
    start = [h for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h]
    if start:
        results["before"] = start[0]
    if evaluate:
        results["after"] = trainer.evaluate()
    return results


def finish_run(trainer, results: dict, name: str, report) -> dict:
    """Save the final model and the trainer state; on the main process write NAME_config.yaml (the keys the
    run was given), NAME_results.json (beside, then renamed), the model card (README.md, bitft.card) and
    REPORT(results) to the console."""
    trainer.save_model(trainer.args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        from bitft.card import write_card
        from bitft.config import save_recipe_config

        save_recipe_config(trainer.args, name, results)
        carry_source_tokenizer(trainer.accelerator.unwrap_model(trainer.model), trainer.args.output_dir)
        path = write_text_atomic(Path(trainer.args.output_dir) / f"{name}_results.json", json.dumps(results, indent=1))
        write_card(path.parent, path.parent)
        report(results)
    trainer.accelerator.wait_for_everyone()  # every process leaves together; run_main then closes the group
    return results


def merged_evaluate(trainer) -> dict | None:
    """Held-out metrics with the LoRA adapters merged into the master weights (which BitLinear re-ternarizes,
    as `bitft export --merge-lora` does), then unmerged. None when the model has no adapters.

    For SFT only: DPO's reference disables the adapters, and peft unmerges merged adapters to do that."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "merge_adapter") or trainer.eval_dataset is None:
        return None
    model.merge_adapter()
    try:
        return trainer.evaluate(metric_key_prefix="eval")
    finally:
        model.unmerge_adapter()


def setup_logging(args) -> None:
    """Console logging: info on the main process, warnings elsewhere."""
    import datasets
    import transformers

    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.WARNING)
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING if args.should_log else logging.ERROR)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.utils.logging.set_verbosity(logging.WARNING)


def setup_wandb(args, project: str = "bitft") -> None:
    """wandb when `report_to` names it: a default project, and offline mode when no login is found."""
    report = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    if "wandb" not in report and "all" not in report:
        return
    os.environ.setdefault("WANDB_PROJECT", project)
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"
            logger.warning("no wandb login found: logging offline (sync later with `wandb sync %s/wandb`)", os.getcwd())
