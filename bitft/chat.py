"""What the SFT and DPO recipes share: chat and preference data, chat templates, the λ=1 policy, LoRA.

    converted checkpoint ─▶ policy at λ=1 (BitLinear quantizes every forward) ─▶ [LoRA adapters]
    chat rows  {messages: [{role, content}, ...]}                     ─▶ TRL SFTTrainer
    preference {prompt, chosen, rejected} (message lists or strings)  ─▶ TRL DPOTrainer
                reference = a frozen copy of the policy at the start, or (LoRA) the same
                weights with the adapters disabled: no second copy in memory

Data comes from the hub (`datasets.load_dataset`) where one is reachable, or from local jsonl/json
files and folders. Rows are normalized to TRL's formats: `messages` (also ShareGPT
`conversations` and Alpaca `instruction`/`input`/`output`) for SFT; `prompt`/`chosen`/`rejected`
(also the UltraFeedback layout where chosen/rejected repeat the prompt, and LLaMA-Factory's ShareGPT
preference layout) for DPO. A held-out slice (`eval_size` rows of a seeded shuffle, or
`eval_dataset`) is never trained on.

Loss on assistant turns only (`assistant_only_loss: true`) needs a chat template with
`{% generation %}` markers, which TRL 1.x either finds or patches in for the templates it knows;
for other templates (SmolLM2's ChatML among them) TRL refuses. Then `assistant_only_fallback`
decides: `last_turn` (default) turns each conversation into prompt = the turns before the last
assistant reply, completion = that reply, and TRL trains on the completion only, for any
template; `full` trains on every token; `error` stops with the reason.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bitft
from bitft.checkpoint import load_source
from bitft.data import DataError, local_files
from bitft.training import ConfigError, ModelArguments, model_source

logger = logging.getLogger("bitft")

LOCAL_SUFFIXES = (".jsonl", ".json")
FALLBACKS = ("last_turn", "full", "error")


class ChatDataError(DataError):
    """A problem with the chat/preference data or the chat template, in one line that names the fix."""


# ----------------------------------------------------------------------------- configuration

@dataclass
class _DataArguments:
    dataset: list[str] = field(default_factory=list, metadata={"help": "hub dataset id, or local jsonl/json files/folders"})
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset config"})
    dataset_split: str = field(default="train", metadata={"help": "hub dataset split"})
    eval_dataset: list[str] | None = field(default=None, metadata={"help": "held-out data (hub id or local files); default: eval_size rows of dataset"})
    eval_split: str = field(default="test", metadata={"help": "hub split of eval_dataset"})
    eval_size: int = field(default=0, metadata={"help": "rows of the shuffled dataset held out for evaluation (never trained on)"})
    max_samples: int | None = field(default=None, metadata={"help": "train on at most this many rows (after the held-out slice)"})


@dataclass
class ChatDataArguments(_DataArguments):
    # data: chat rows ({messages}); the chat template comes from the tokenizer or SFTConfig.chat_template_path
    assistant_only_fallback: str = field(default="last_turn", metadata={
        "help": "when assistant_only_loss is set but the template has no {% generation %} markers TRL can use: "
                "last_turn (loss on the final assistant reply), full (every token) or error"})


@dataclass
class PreferenceDataArguments(_DataArguments):
    # data: preference rows ({prompt, chosen, rejected}); DPOConfig has no chat_template_path, so it is here
    chat_template_path: str | None = field(default=None, metadata={
        "help": "chat template when the tokenizer has none: a .jinja file, or a tokenizer folder / hub id to take it from"})


@dataclass
class LoraArguments:
    # LoRA (peft) on the BitLinear layers; the ternary base stays frozen. Names as in TRL's ModelConfig.
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters instead of the master weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "module names or suffixes; default: every BitLinear"})


def _device_bf16(self) -> None:
    """bf16=None (TRL's default, which means True) becomes False where there is no bf16 GPU, instead of an error."""
    if self.bf16 is None and not self.fp16:
        self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


from trl import DPOConfig as _DPOConfig, SFTConfig as _SFTConfig  # noqa: E402


@dataclass
class BitSFTConfig(_SFTConfig):
    """TRL's SFTConfig; bf16 left unset follows the device (TRL would turn it on and fail on CPU)."""

    def __post_init__(self):
        _device_bf16(self)
        super().__post_init__()


@dataclass
class BitDPOConfig(_DPOConfig):
    """TRL's DPOConfig; bf16 left unset follows the device (TRL would turn it on and fail on CPU)."""

    def __post_init__(self):
        _device_bf16(self)
        super().__post_init__()


def parse_trl_config(types, argv=None):
    """Dataclasses from `--config FILE.yaml` plus flags, through TRL's own TrlParser (unknown keys are errors)."""
    import sys

    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file")
        if not Path(argv[i + 1]).is_file():
            raise ConfigError(f"config file {argv[i + 1]} not found")
    parser = TrlParser(types)
    known = {a.dest for a in parser._actions}
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as e:
        msg = str(e)
        bad = re.findall(r"--(\w+)", msg.split("Please remove")[0]) or re.findall(r"'--?(\w+)", msg)
        hints = [f"{b} (did you mean {m[0]}?)" for b in bad if (m := difflib.get_close_matches(b, known, 1))]
        raise ConfigError(msg.splitlines()[0] + (f"  Hint: {'; '.join(hints)}" if hints else "")) from None


# ----------------------------------------------------------------------------- reading rows

def _read_local(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        if isinstance(rows, dict):
            rows = rows.get("data", rows.get("rows", [rows]))
        return list(rows)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_rows(sources: list[str] | str, config: str | None = None, split: str = "train"):
    """Rows of local jsonl/json files and folders (a list of dicts), or one hub dataset split (a datasets.Dataset)."""
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    if not sources:
        raise ChatDataError("no dataset given: pass local jsonl/json files or folders, or a hub dataset id")
    try:
        files = local_files(sources, suffixes=LOCAL_SUFFIXES)
    except DataError as e:
        raise ChatDataError(str(e)) from None
    if files is not None:
        return [row for f in files for row in _read_local(f)]
    if len(sources) != 1:
        raise ChatDataError(f"a hub dataset is one id, got {sources}")
    import datasets

    try:
        return datasets.load_dataset(sources[0], config, split=split)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChatDataError(f"cannot load {sources[0]} ({config or 'default'}, split {split}) from the Hugging Face hub "
                            f"({reason}); pass local jsonl/json files instead (e.g. ../shared/data/sft)") from None


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "function_call": "assistant", "observation": "tool"}


def _sharegpt(turns) -> list[dict]:
    return [{"role": _SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value", "")} for t in turns]


def _messages(msgs) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def chat_row(row: dict, where: str = "") -> dict:
    """{messages} from a `messages`, ShareGPT `conversations` or Alpaca row."""
    if "messages" in row:
        return {"messages": _messages(row["messages"])}
    if "conversations" in row:
        return {"messages": _sharegpt(row["conversations"])}
    if "instruction" in row and "output" in row:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}
    raise ChatDataError(f"{where}: a chat row needs `messages` (a list of {{role, content}}), "
                        f"ShareGPT `conversations` or Alpaca `instruction`/`output`; it has {sorted(row)}")


def preference_row(row: dict, where: str = "") -> dict:
    """{prompt, chosen, rejected}: message lists (conversational) or strings (plain), prompt explicit."""
    if "chosen" not in row or "rejected" not in row:
        raise ChatDataError(f"{where}: a preference row needs `chosen` and `rejected` (and `prompt`); it has {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, dict):  # LLaMA-Factory ShareGPT: conversations + one chosen / rejected turn
        prompt = _sharegpt(row.get("conversations", []))
        return {"prompt": prompt, "chosen": _sharegpt([chosen]), "rejected": _sharegpt([rejected])}
    if isinstance(chosen, str):
        if not isinstance(row.get("prompt"), str):
            raise ChatDataError(f"{where}: plain (string) chosen/rejected need a string `prompt`")
        return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
    chosen, rejected = _messages(chosen), _messages(rejected)
    prompt = row.get("prompt")
    if prompt is None or isinstance(prompt, str):
        # implicit prompt (UltraFeedback): chosen and rejected both start with the prompt turns
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            if isinstance(prompt, str):
                return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}
            raise ChatDataError(f"{where}: no `prompt`, and chosen/rejected share no leading turns to take it from")
        return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    return {"prompt": _messages(prompt), "chosen": chosen, "rejected": rejected}


def normalized(sources, config: str | None, split: str, kind: str):
    """A datasets.Dataset of rows in TRL's form (`kind`: "chat" or "preference"); hub data is mapped, not listed."""
    import datasets

    norm = chat_row if kind == "chat" else preference_row
    rows = read_rows(sources, config, split)
    if isinstance(rows, list):
        ds = datasets.Dataset.from_list([norm(r, f"{sources} row {i}") for i, r in enumerate(rows)])
    else:
        ds = rows.map(lambda r: norm(r, str(sources)), remove_columns=rows.column_names)
    if kind == "chat" and len(ds):
        ds = ds.filter(lambda r: any(m["role"] == "assistant" for m in r["messages"]))
    if not len(ds):
        raise ChatDataError(f"{sources} holds no usable {kind} rows")
    return ds


def build_datasets(args: _DataArguments, kind: str, seed: int):
    """(train, eval or None) as datasets.Dataset, rows normalized for TRL (`kind`: "chat" or "preference").

    The held-out slice is the first eval_size rows of a seeded shuffle (or eval_dataset); training
    uses the rest, in that shuffled order, at most max_samples of them.
    """
    ds = normalized(args.dataset, args.dataset_config, args.dataset_split, kind)
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    if args.eval_dataset:
        train, held = ds.select(order), normalized(args.eval_dataset, args.dataset_config, args.eval_split, kind)
    else:
        if args.eval_size >= len(ds):
            raise ChatDataError(f"eval_size={args.eval_size} leaves no training row out of {len(ds)}: lower it")
        train, held = ds.select(order[args.eval_size:]), ds.select(order[: args.eval_size])
    if args.max_samples:
        train = train.select(range(min(args.max_samples, len(train))))
    return train, (held if len(held) else None)


# ----------------------------------------------------------------------------- chat templates

def apply_template_source(tokenizer, source: str | None) -> None:
    """Put the chat template named by SOURCE (.jinja file, or a tokenizer folder / hub id) on TOKENIZER."""
    if not source:
        return
    p = Path(source).expanduser()
    if p.is_file():
        tokenizer.chat_template = p.read_text(encoding="utf-8")
        return
    from transformers import AutoTokenizer

    try:
        tokenizer.chat_template = AutoTokenizer.from_pretrained(source).chat_template
    except Exception as e:
        raise ChatDataError(f"chat_template_path {source}: not a .jinja file and no tokenizer could be loaded from it "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not tokenizer.chat_template:
        raise ChatDataError(f"chat_template_path {source}: that tokenizer has no chat template either")


def require_chat_template(tokenizer, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatDataError(
            f"the tokenizer of {model_name} has no chat template, and conversational data needs one: set "
            "chat_template_path to a .jinja file or to a tokenizer folder / hub id whose template fits the model "
            "(in the YAML or as --chat_template_path), or use a tokenizer that has one (tokenizer_name_or_path)")


def assistant_mask_template(tokenizer) -> str | None:
    """The template TRL would mask assistant tokens with (the tokenizer's own or its patched twin), or None."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    tpl = tokenizer.chat_template
    if tpl and has_generation_markers(tpl if isinstance(tpl, str) else tpl.get("default", "")):
        return tpl
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        return None


def last_turn_example(row: dict) -> dict | None:
    """prompt = every turn before the last assistant reply, completion = that reply (None: no reply)."""
    msgs = row["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if not last:
        return None
    return {"prompt": msgs[:last], "completion": [msgs[last]]}


def resolve_assistant_only(tokenizer, train, held, want: bool, fallback: str):
    """(assistant_only_loss for SFTConfig, train, eval, how): TRL's masking where the template allows it."""
    if fallback not in FALLBACKS:
        raise ConfigError(f"assistant_only_fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if not want:
        return False, train, held, "loss on every token (assistant_only_loss: false)"
    if assistant_mask_template(tokenizer) is not None:
        return True, train, held, "loss on assistant turns (TRL masks them with the template's generation markers)"
    why = ("the chat template has no {% generation %} markers and TRL 1.x cannot patch it, so TRL's "
           "assistant_only_loss would refuse it")
    if fallback == "error":
        raise ChatDataError(f"{why}: give a template with markers (chat_template_path) or set assistant_only_fallback "
                            "to last_turn or full")
    if fallback == "full":
        logger.warning("%s: training on every token (assistant_only_fallback: full)", why)
        return False, train, held, "loss on every token (template without generation markers)"
    logger.warning("%s: training on the last assistant reply of each conversation instead "
                   "(prompt/completion, completion-only loss; assistant_only_fallback: last_turn)", why)

    def convert(ds):
        if ds is None:
            return None
        import datasets

        rows = [e for r in ds if (e := last_turn_example(r)) is not None]
        return datasets.Dataset.from_list(rows)

    return False, convert(train), convert(held), "loss on the last assistant reply (prompt/completion; template without generation markers)"


# ----------------------------------------------------------------------------- model, LoRA, reference

def load_policy(model_args: ModelArguments):
    """(model at λ=1, tokenizer, is_bitft_checkpoint): a bitft checkpoint, or any source converted on the fly."""
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a bitft checkpoint, e.g. the warmup output folder)")
    source = model_source(model_args.model_name_or_path)
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())  # LoRA adapters record it as their base
    model, tokenizer = load_source(source, dtype=getattr(torch, model_args.torch_dtype))
    if getattr(model, "hf_quantizer", None) is None and getattr(model, "is_quantized", False):
        model.is_quantized = False  # a GGUF comes out dequantized; the Trainer would refuse a "quantized" model
    is_checkpoint = bool(getattr(model.config, "bitft", None))
    if is_checkpoint:
        lam = bitft.get_lambda(model)
        if lam != 1.0:
            logger.warning("%s is at λ=%g; SFT and DPO train the ternary model: setting λ=1", model_args.model_name_or_path, lam)
    else:
        bitft.convert_model(model, lam=1.0, targets=model_args.targets, exclude=model_args.exclude, subln=model_args.subln)
        logger.warning("%s is not a bitft checkpoint: converted on the fly at λ=1 (%d BitLinear layers), untrained",
                       model_args.model_name_or_path, len(model.config.bitft["modules"]))
    bitft.set_lambda(model, 1.0)
    model.config.use_cache = False
    if model_args.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    if tokenizer is None:
        raise ConfigError(f"{model_args.model_name_or_path} has no tokenizer: set tokenizer_name_or_path")
    return model, tokenizer, is_checkpoint


def lora_config(args: LoraArguments, model, is_checkpoint: bool):
    """peft LoraConfig on the BitLinear layers (None without use_peft)."""
    if not args.use_peft:
        return None
    if not is_checkpoint:
        raise ConfigError("use_peft needs a converted checkpoint folder as model_name_or_path (the adapters name it as "
                          "their base, and `bitft export --merge-lora` merges into it): run `bitft convert` or warmup first")
    from peft import LoraConfig

    targets = args.lora_target_modules or sorted({n.rsplit(".", 1)[-1] for n in model.config.bitft["modules"]})
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def frozen_copy(model):
    """The DPO reference: the policy as it is now, frozen, BitLinear and λ included."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def lambda_callback():
    """λ held at 1 and logged with every training log (the warmup recipe's callback, constant schedule)."""
    from bitft.schedule import LambdaCallback, LambdaSchedule

    return LambdaCallback(LambdaSchedule("constant", value=1.0))


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
