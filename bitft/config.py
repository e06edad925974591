"""Every recipe's configuration: bitft's `*Arguments` dataclasses and the one parser that fills them.

A recipe's keys are the fields of the dataclasses it names (bitft's below, plus the Hugging Face
TrainingArguments / TRL SFTConfig / DPOConfig fields), given in `--config FILE.yaml` (a flat
mapping) and overridden by `--key value` flags. `parse_config` is a thin wrapper of TRL's
TrlParser (an HfArgumentParser that reads `--config`): it first checks every YAML key and flag
against the fields, so an unknown one is a ConfigError that says what it probably meant.

Model keys and LoRA keys are TRL's `ModelConfig` (model_name_or_path, dtype, use_peft, lora_r, ...),
extended with bitft's on-the-fly conversion keys; `get_peft_config` builds the LoraConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from transformers import TrainingArguments
from trl import DPOConfig, ModelConfig, SFTConfig, TrlParser

from bitft.errors import ConfigError

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
ASSISTANT_FALLBACKS = ("last_turn", "full", "error")


@dataclass
class ModelArguments(ModelConfig):
    """TRL's ModelConfig (model, dtype, LoRA) plus the keys of an on-the-fly conversion."""

    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "tokenizer, when the model source has none"})
    targets: list[str] | None = field(default=None, metadata={"help": "on-the-fly conversion: linear layers to convert (names or suffixes)"})
    exclude: list[str] | None = field(default=None, metadata={"help": "on-the-fly conversion: linear layers to keep full precision"})
    subln: str = field(default="false", metadata={
        "help": "on-the-fly conversion: SubLN false, true (a norm before every BitLinear) or bitnet (before o_proj "
                "and down_proj: a Llama becomes a BitNet)"})
    ternary_init: str = field(default="absmean", metadata={
        "help": "warmup from λ=1 only: rewrite the master weights so that their absmean codes and scale are "
                "those of another rule: absmean (no change), mse (Lloyd's least-squares ternary scale), a factor "
                "of the absmean, or gptq (error-compensated codes on calibration blocks; bitft.ternary_init)"})
    ternary_init_blocks: int = field(default=16, metadata={
        "help": "ternary_init gptq: the training blocks whose full-precision activations calibrate it"})
    full_precision_lr_scale: float = field(default=1.0, metadata={
        "help": "learning rate of the parameters that stay full precision (embeddings, norms, an untied head) as a "
                "multiple of learning_rate; BitLinear weights and LoRA adapters keep learning_rate"})

    def __post_init__(self):
        super().__post_init__()
        if not self.full_precision_lr_scale >= 0:
            raise ConfigError(f"full_precision_lr_scale must be >= 0 (1 = one learning rate), got {self.full_precision_lr_scale}")

    def torch_dtype(self):
        """The master weights' dtype for from_pretrained ("auto" keeps the checkpoint's)."""
        return "auto" if self.dtype in (None, "auto") else getattr(torch, self.dtype)

    def conversion(self) -> dict:
        """convert_model's keyword arguments for a source that is not a bitft checkpoint yet."""
        from bitft.subln import parse_subln

        try:
            return {"targets": self.targets, "exclude": self.exclude, "subln": parse_subln(self.subln)}
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class LambdaArguments:
    # λ: 0 = full precision, 1 = ternary; set on every BitLinear once per optimizer step
    lambda_schedule: str = field(default="linear", metadata={"help": "linear, sigmoid or constant"})
    lambda_warmup_steps: int = field(default=1000, metadata={"help": "optimizer steps until λ reaches 1"})
    lambda_k: float = field(default=10.0, metadata={"help": "slope of the sigmoid schedule"})
    lambda_value: float = field(default=1.0, metadata={"help": "λ of the constant schedule"})

    def schedule(self):
        from bitft.schedule import LambdaSchedule

        try:
            return LambdaSchedule(self.lambda_schedule, self.lambda_warmup_steps, self.lambda_k, self.lambda_value)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class DistillArguments:
    # distillation from the full-precision teacher (BitDistill); all zero = plain cross-entropy
    distill_alpha: float = field(default=0.0, metadata={"help": "weight α of the logits KD term; the cross-entropy gets 1 − α"})
    distill_temperature: float = field(default=1.0, metadata={"help": "KD temperature τ (the KL is scaled by τ²)"})
    attention_distill_weight: float = field(default=0.0, metadata={"help": "weight of the Q/K/V relation distillation (MiniLM-v2); 0 = off"})
    attention_distill_layer: int = field(default=-1, metadata={"help": "decoder layer of the relation distillation (default the last)"})
    hidden_distill_weight: float = field(default=0.0, metadata={
        "help": "weight of the hidden-state distillation (every layer's ‖h_S − h_T‖²/‖h_T‖², bitft.train.feature_kd); 0 = off"})
    teacher_name_or_path: str | None = field(default=None, metadata={
        "help": "teacher model (same tokenizer); default: the model the run starts from, in full precision"})
    teacher_dtype: str | None = field(default=None, metadata={"help": "teacher dtype (default: the master weights')"})
    distill_chunk_size: int = field(default=1024, metadata={"help": "positions per chunk of teacher logits"})
    distill_recompute: bool = field(default=False, metadata={
        "help": "recompute each chunk's KD gradient in the backward pass instead of holding one logits-sized tensor"})
    distill_top_k: int = field(default=0, metadata={
        "help": "distill only the teacher's K most likely tokens plus one tail class (0 = the full vocabulary)"})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "folder written by `bitft teacher-cache`: the blocks and the teacher's top-k; no teacher runs"})

    def __post_init__(self):
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha must be in [0, 1] (0 = cross-entropy only), got {self.distill_alpha}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.attention_distill_weight < 0:
            raise ConfigError(f"attention_distill_weight must be >= 0, got {self.attention_distill_weight}")
        if not self.hidden_distill_weight >= 0:
            raise ConfigError(f"hidden_distill_weight must be >= 0, got {self.hidden_distill_weight}")
        if self.distill_chunk_size < 1:
            raise ConfigError(f"distill_chunk_size must be >= 1, got {self.distill_chunk_size}")
        if self.distill_top_k < 0:
            raise ConfigError(f"distill_top_k must be >= 0 (0 = the full vocabulary), got {self.distill_top_k}")
        if self.teacher_cache and (self.attention_distill_weight or self.hidden_distill_weight or not self.distill_alpha):
            raise ConfigError("teacher_cache holds the teacher's top-k logits only: set distill_alpha > 0 and "
                              "attention_distill_weight and hidden_distill_weight to 0 (feature distillation "
                              "needs the teacher itself)")
        if self.teacher_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"teacher_dtype must be float32, bfloat16 or float16, got {self.teacher_dtype!r}")

    @property
    def active(self) -> bool:
        return self.distill_alpha > 0 or self.attention_distill_weight > 0 or self.hidden_distill_weight > 0

    def torch_teacher_dtype(self):
        return getattr(torch, self.teacher_dtype) if self.teacher_dtype else None


@dataclass
class PretrainDataArguments:
    # data: FineWeb-edu streamed from the hub, or local jsonl/json/parquet/txt files and folders
    dataset: list[str] = field(default_factory=lambda: [FINEWEB_EDU], metadata={"help": "hub dataset id, or local files/folders"})
    dataset_config: str | None = field(default="sample-10BT", metadata={"help": "hub dataset config"})
    dataset_split: str = field(default="train", metadata={"help": "hub dataset split"})
    text_field: str = field(default="text", metadata={"help": "column/field that holds the document text"})
    block_size: int = field(default=2048, metadata={"help": "tokens per packed training sequence"})
    eval_blocks: int = field(default=64, metadata={"help": "held-out blocks for evaluation (whole documents, never trained on)"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "streaming shuffle buffer (documents)"})
    max_documents: int | None = field(default=None, metadata={"help": "use only the first N documents of the shuffled order"})


@dataclass
class ClusterArguments:
    # preemption and relaunch (SLURM, Kubernetes): docs/cluster.md#what-a-signal-does
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"], metadata={
        "help": "signals that stop the run after the current optimizer step with a checkpoint (exit 75); [] = none"})
    allow_batch_change: bool = field(default=False, metadata={
        "help": "resume a checkpoint with another number of tokens per optimizer step (refused otherwise)"})


@dataclass
class BlockwiseArguments:
    # block-wise reconstruction before the end-to-end phase (bitft.train.blockwise); block_steps 0 = none
    block_steps: int = field(default=0, metadata={
        "help": "block-wise phase: at most this many optimizer steps per decoder block (0 = no block phase)"})
    block_calibration_blocks: int = field(default=64, metadata={
        "help": "block-wise phase: training blocks (block_size tokens) it trains on, the first ones of the training data"})
    block_heldout_blocks: int = field(default=16, metadata={
        "help": "block-wise phase: the next training blocks, held out for its early stop (never the recipe's eval blocks)"})
    block_batch_size: int = field(default=4, metadata={"help": "block-wise phase: sequences per optimizer step"})
    block_learning_rate: float = field(default=1e-3, metadata={"help": "block-wise phase: peak AdamW learning rate"})
    block_warmup_steps: int = field(default=0, metadata={"help": "block-wise phase: linear warmup steps of each block's cosine"})
    block_eval_steps: int = field(default=16, metadata={"help": "block-wise phase: held-out error every N steps"})
    block_patience: int = field(default=2, metadata={
        "help": "block-wise phase: stop a block after N held-out evaluations without a new best (its best weights kept)"})
    block_save_steps: int = field(default=32, metadata={
        "help": "block-wise phase: write its resumable state every N steps (and at each block's end; 0 = block ends only)"})
    block_activations: str = field(default="auto", metadata={
        "help": "block-wise phase: where the two activation streams live: memory, disk (memory-mapped files in "
                "output_dir/blockwise) or auto (disk when they need over half the available memory)"})
    block_equalize: bool = field(default=False, metadata={
        "help": "block-wise phase: also learn per-channel scales (OmniQuant's LET) folded at each block's end into the "
                "norms and q/k/v, gate/up, v→o and up→down weights (bitft.train.equalize); the model stays a plain one"})
    block_equalize_learning_rate: float = field(default=1e-2, metadata={
        "help": "block-wise phase with block_equalize: peak AdamW learning rate of the scales' logs"})

    def __post_init__(self):
        for name in ("block_steps", "block_warmup_steps", "block_save_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("block_calibration_blocks", "block_heldout_blocks", "block_batch_size", "block_eval_steps",
                     "block_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("block_calibration_blocks", "block_heldout_blocks"):
            if getattr(self, name) % self.block_batch_size:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of block_batch_size "
                                  f"({self.block_batch_size})")
        for name in ("block_learning_rate", "block_equalize_learning_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.block_activations not in ("auto", "memory", "disk"):
            raise ConfigError(f"block_activations must be auto, memory or disk, got {self.block_activations!r}")

    @property
    def active(self) -> bool:
        return self.block_steps > 0


@dataclass
class RowDataArguments:
    dataset: list[str] = field(default_factory=list, metadata={"help": "hub dataset id, or local jsonl/json files/folders"})
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset config"})
    dataset_split: str = field(default="train", metadata={"help": "hub dataset split"})
    eval_dataset: list[str] | None = field(default=None, metadata={"help": "held-out data (hub id or local files); default: eval_size rows of dataset"})
    eval_split: str = field(default="test", metadata={"help": "hub split of eval_dataset"})
    eval_size: int = field(default=0, metadata={"help": "rows of the shuffled dataset held out for evaluation (never trained on)"})
    max_samples: int | None = field(default=None, metadata={"help": "train on at most this many rows (after the held-out slice)"})


@dataclass
class ChatDataArguments(RowDataArguments):
    # data: chat rows ({messages}); the chat template comes from the tokenizer or SFTConfig.chat_template_path
    assistant_only_fallback: str = field(default="last_turn", metadata={
        "help": "when assistant_only_loss is set but the template has no {% generation %} markers TRL can use: "
                "last_turn (loss on the final assistant reply), full (every token) or error"})

    def __post_init__(self):
        if self.assistant_only_fallback not in ASSISTANT_FALLBACKS:
            raise ConfigError(f"assistant_only_fallback must be one of {', '.join(ASSISTANT_FALLBACKS)}, "
                              f"got {self.assistant_only_fallback!r}")


@dataclass
class PreferenceDataArguments(RowDataArguments):
    # data: preference rows ({prompt, chosen, rejected}); DPOConfig has no chat_template_path, so it is here
    chat_template_path: str | None = field(default=None, metadata={
        "help": "chat template when the tokenizer has none: a .jinja file, or a tokenizer folder / hub id to take it from"})


def _device_bf16(config) -> None:
    """bf16=None (TRL's default, which means True) becomes False where there is no bf16 GPU, instead of an error."""
    if config.bf16 is None and not config.fp16:
        config.bf16 = bool(not config.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class BitSFTConfig(SFTConfig):
    """TRL's SFTConfig; bf16 left unset follows the device (TRL would turn it on and fail on CPU)."""

    def __post_init__(self):
        _device_bf16(self)
        super().__post_init__()


@dataclass
class BitDPOConfig(DPOConfig):
    """TRL's DPOConfig; bf16 left unset follows the device (TRL would turn it on and fail on CPU)."""

    def __post_init__(self):
        _device_bf16(self)
        super().__post_init__()


def _unknown(name: str, known: set[str], prefix: str = "") -> str:
    m = difflib.get_close_matches(name, known, 1)
    return f"{prefix}{name} (did you mean {prefix}{m[0]}?)" if m else f"{prefix}{name}"


def parse_config(types, argv: list[str] | None = None):
    """Dataclass instances from `--config FILE.yaml` plus flags that override its keys (TRL's TrlParser)."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    values: dict = {}
    parser = TrlParser(types)
    known = {f.name for t in parser.dataclass_types for f in dataclasses.fields(t) if f.init}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must be a YAML mapping of key: value")
        unknown = sorted(set(values) - known - {"env"})  # `env:` sets environment variables (TrlParser)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s): {', '.join(_unknown(k, known) for k in unknown)}")
    for a in argv:
        if a.startswith("--") and a != "--config":
            name = a[2:].split("=", 1)[0]
            if name not in known and not (name.startswith("no_") and name[3:] in known):
                raise ConfigError(f"unknown flag {_unknown(name, known, '--')}")
    try:
        parsed = parser.parse_args_and_config(argv)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    _record(parsed, argv, values if "--config" in argv else {})
    return parsed


def _plain(v):
    """A value yaml.safe_dump writes: enums by their value, containers element by element, others as text."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def _record(parsed, argv: list[str], values: dict) -> None:
    """Attach to the parsed TrainingArguments (`bitft_recipe`) what the run was given: the config file, the
    flags, and the value each given key took; `save_recipe_config` writes it beside the final model."""
    flags = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and a != "--config"]
    known = {f.name for obj in parsed for f in dataclasses.fields(obj)}
    given = (set(values) - {"env"}) | {f[3:] if f.startswith("no_") and f not in known else f for f in flags}
    chosen = {}
    for obj in parsed:
        chosen.update({f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name in given})
    file = argv[argv.index("--config") + 1] if "--config" in argv else None
    for obj in parsed:
        if isinstance(obj, TrainingArguments):
            obj.bitft_recipe = {"file": str(Path(file).resolve()) if file else None, "flags": flags, "values": chosen}


def save_recipe_config(args, name: str, results: dict) -> None:
    """Write OUTPUT_DIR/NAME_config.yaml, the keys the run was given (config file and flags) with the values it used
    (a valid --config for the same recipe), and note in RESULTS which file and flags they came from."""
    import yaml

    from bitft.files import write_text_atomic

    record = getattr(args, "bitft_recipe", None)
    if record is None:
        return
    path = Path(args.output_dir) / f"{name}_config.yaml"
    write_text_atomic(path, yaml.safe_dump(record["values"], sort_keys=True, allow_unicode=True))
    results["config"] = {"file": record["file"], "flags": record["flags"]}
