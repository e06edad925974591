"""Chat and preference data for the SFT and DPO recipes, and the chat templates they need.

    chat rows  {messages: [{role, content}, ...]}                     ─▶ TRL SFTTrainer
    preference {prompt, chosen, rejected} (message lists or strings)  ─▶ TRL DPOTrainer

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

import logging
import random
from pathlib import Path

from bitft.config import RowDataArguments
from bitft.data.local import load_file, local_files
from bitft.errors import DataError

logger = logging.getLogger("bitft")

LOCAL_SUFFIXES = (".jsonl", ".json")


# ----------------------------------------------------------------------------- reading rows

def read_rows(sources: list[str] | str, config: str | None = None, split: str = "train"):
    """The rows of local jsonl/json files and folders, or of one hub dataset split, as a datasets.Dataset."""
    import datasets

    sources = [sources] if isinstance(sources, str) else list(sources or [])
    if not sources:
        raise DataError("no dataset given: pass local jsonl/json files or folders, or a hub dataset id")
    files = local_files(sources, suffixes=LOCAL_SUFFIXES)
    if files is not None:
        parts = [load_file(f) for f in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(sources) != 1:
        raise DataError(f"a hub dataset is one id, got {sources}")
    try:
        return datasets.load_dataset(sources[0], config, split=split)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {sources[0]} ({config or 'default'}, split {split}) from the Hugging Face hub "
                        f"({reason}); pass local jsonl/json files instead") from None


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "function_call": "assistant", "observation": "tool"}


def _sharegpt(turns) -> list[dict]:
    return [{"role": _SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value", "")} for t in turns]


def _messages(msgs) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _fields(row: dict) -> list[str]:
    """The fields a row has (rows read by `datasets` carry None for the fields other rows have)."""
    return sorted(k for k, v in row.items() if v is not None)


def chat_row(row: dict, where: str = "") -> dict:
    """{messages} from a `messages`, ShareGPT `conversations` or Alpaca row."""
    row = {k: v for k, v in row.items() if v is not None}
    if "messages" in row:
        return {"messages": _messages(row["messages"])}
    if "conversations" in row:
        return {"messages": _sharegpt(row["conversations"])}
    if "instruction" in row and "output" in row:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}
    raise DataError(f"{where}: a chat row needs `messages` (a list of {{role, content}}), "
                        f"ShareGPT `conversations` or Alpaca `instruction`/`output`; it has {_fields(row)}")


def preference_row(row: dict, where: str = "") -> dict:
    """{prompt, chosen, rejected}: message lists (conversational) or strings (plain), prompt explicit."""
    row = {k: v for k, v in row.items() if v is not None}
    if "chosen" not in row or "rejected" not in row:
        raise DataError(f"{where}: a preference row needs `chosen` and `rejected` (and `prompt`); it has {_fields(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, dict):  # LLaMA-Factory ShareGPT: conversations + one chosen / rejected turn
        prompt = _sharegpt(row.get("conversations", []))
        return {"prompt": prompt, "chosen": _sharegpt([chosen]), "rejected": _sharegpt([rejected])}
    if isinstance(chosen, str):
        if not isinstance(row.get("prompt"), str):
            raise DataError(f"{where}: plain (string) chosen/rejected need a string `prompt`")
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
            raise DataError(f"{where}: no `prompt`, and chosen/rejected share no leading turns to take it from")
        return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    return {"prompt": _messages(prompt), "chosen": chosen, "rejected": rejected}


def normalized(sources, config: str | None, split: str, kind: str):
    """A datasets.Dataset of rows in TRL's form (`kind`: "chat" or "preference"); hub data is mapped, not listed."""
    norm = chat_row if kind == "chat" else preference_row
    rows = read_rows(sources, config, split)
    ds = rows.map(lambda r, i: norm(r, f"{sources} row {i}"), with_indices=True, remove_columns=rows.column_names)
    if kind == "chat" and len(ds):
        ds = ds.filter(lambda r: any(m["role"] == "assistant" for m in r["messages"]))
    if not len(ds):
        raise DataError(f"{sources} holds no usable {kind} rows")
    return ds


def build_datasets(args: RowDataArguments, kind: str, seed: int):
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
            raise DataError(f"eval_size={args.eval_size} leaves no training row out of {len(ds)}: lower it")
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
        raise DataError(f"chat_template_path {source}: not a .jinja file and no tokenizer could be loaded from it "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not tokenizer.chat_template:
        raise DataError(f"chat_template_path {source}: that tokenizer has no chat template either")


def require_chat_template(tokenizer, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
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
    if not want:
        return False, train, held, "loss on every token (assistant_only_loss: false)"
    if assistant_mask_template(tokenizer) is not None:
        return True, train, held, "loss on assistant turns (TRL masks them with the template's generation markers)"
    why = ("the chat template has no {% generation %} markers and TRL 1.x cannot patch it, so TRL's "
           "assistant_only_loss would refuse it")
    if fallback == "error":
        raise DataError(f"{why}: give a template with markers (chat_template_path) or set assistant_only_fallback "
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
