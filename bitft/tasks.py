"""Zero-shot multiple-choice tasks, scored the way lm-evaluation-harness (0.4.x) scores them.

Each example becomes one (context, continuation) request per choice; the model's score for a choice
is the summed log-likelihood of the continuation's tokens given the context. The prompt formats are
the harness's task configs, read from its task files (lm_eval 0.4.9):

| task | context | continuations | metrics |
|---|---|---|---|
| arc_easy, arc_challenge | "Question: {question}\\nAnswer:" | " {choice}" for each choices.text | acc, acc_norm |
| hellaswag | preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}") | " {preprocess(ending)}" | acc, acc_norm |
| piqa | "Question: {goal}\\nAnswer:" | " {sol1}", " {sol2}" | acc, acc_norm |
| boolq | "{passage}\\nQuestion: {question}?\\nAnswer:" | " no", " yes" | acc |
| openbookqa | "{question_stem}" | " {choice}" | acc, acc_norm |
| winogrande | the sentence up to "_", with the option substituted (one context per option) | " {the shared rest of the sentence}" (partial evaluation) | acc |

acc: the gold choice has the highest log-likelihood. acc_norm: the gold choice has the highest
log-likelihood divided by the length of the choice string (the harness's `len(choice)`: characters
of the choice without the leading space, which is its UTF-8 byte length for ASCII text).
Tokenization follows the harness's `_encode_pair`: trailing whitespace of the context moves to
the continuation, the pair is tokenized as one string (no special tokens) and the continuation's
tokens are those after the context's own tokenization. Inputs longer than the model's context are
cut on the left, as the harness does. Ties go to the first choice (numpy argmax).

The data are local jsonl files with the hub datasets' fields (../shared/data/eval).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bitft.checkpoint import BitftError


@dataclass
class Doc:
    requests: list[tuple[str, str]]  # (context, continuation) per choice
    choices: list[str]               # what acc_norm measures the length of
    gold: int


@dataclass
class Task:
    name: str
    filename: str
    fields: tuple[str, ...]
    to_doc: Callable[[dict], Doc]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    title: str = ""


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([(context, f" {c}") for c in choices], list(choices), gold)


def _arc(d):
    return _mc(f"Question: {d['question']}\nAnswer:", d["choices"]["text"], d["choices"]["label"].index(d["answerKey"]))


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artifacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d):
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return _mc(hellaswag_preprocess(d["activity_label"] + ": " + ctx),
               [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"]))


def _piqa(d):
    return _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def _boolq(d):
    answer = d["answer"] if "answer" in d else bool(d["label"])  # hub `google/boolq` has answer; super_glue has label
    return _mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(bool(answer)))


def _openbookqa(d):
    return _mc(d["question_stem"], d["choices"]["text"], d["choices"]["label"].index(d["answerKey"].lstrip()))


def _winogrande(d):
    s = d["sentence"]
    i = s.index("_")
    suffix = s[i + 1:].strip()
    contexts = [s[:i] + d["option1"], s[:i] + d["option2"]]
    return Doc([(c, f" {suffix}") for c in contexts], contexts, {"1": 0, "2": 1}[str(d["answer"])])


TASKS = {t.name: t for t in [
    Task("arc_easy", "arc_easy_validation.jsonl", ("question", "choices", "answerKey"), _arc, title="ARC-Easy"),
    Task("arc_challenge", "arc_challenge_validation.jsonl", ("question", "choices", "answerKey"), _arc,
         title="ARC-Challenge"),
    Task("hellaswag", "hellaswag_validation_sample500_seed0.jsonl",
         ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag, title="HellaSwag"),
    Task("piqa", "piqa_validation.jsonl", ("goal", "sol1", "sol2", "label"), _piqa, title="PIQA"),
    Task("boolq", "boolq_validation_sample500_seed0.jsonl", ("passage", "question"), _boolq, ("acc",), "BoolQ"),
    Task("openbookqa", "openbookqa_main_validation.jsonl", ("question_stem", "choices", "answerKey"), _openbookqa,
         title="OpenBookQA"),
    Task("winogrande", "winogrande_xl_validation.jsonl", ("sentence", "option1", "option2", "answer"), _winogrande,
         ("acc",), "WinoGrande"),
]}


def parse_tasks(spec) -> list[str]:
    """Task names from a list of names and comma lists ('all' = every task), in the order given."""
    names = []
    for part in spec:
        for name in part.split(","):
            name = name.strip().lower().replace("-", "_")
            if not name:
                continue
            add = list(TASKS) if name == "all" else [name]
            for n in add:
                if n not in TASKS:
                    raise BitftError(f"unknown task '{name}': choose from {', '.join(TASKS)} or all")
                if n not in names:
                    names.append(n)
    if not names:
        raise BitftError(f"no task named: choose from {', '.join(TASKS)} or all")
    return names


def task_file(task: Task, folder: Path) -> Path:
    path = Path(folder) / task.filename
    if not path.is_file():
        raise BitftError(f"{task.name}: {path} not found: pass --tasks-dir with the folder of the local "
                         f"task files ({task.filename}, hub fields)")
    return path


def load_docs(name: str, folder: Path, limit: int | None = None) -> list[Doc]:
    """The first LIMIT examples of task NAME from its jsonl file in FOLDER, as Docs."""
    task = TASKS[name]
    path = task_file(task, folder)
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BitftError(f"{path}:{lineno} is not valid JSON ({e})") from None
            missing = [k for k in task.fields if k not in row]
            if missing:
                raise BitftError(f"{path}:{lineno} lacks {', '.join(missing)}: {task.name} expects the hub "
                                 f"fields {', '.join(task.fields)}")
            try:
                docs.append(task.to_doc(row))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise BitftError(f"{path}:{lineno} is not a valid {task.name} example ({type(e).__name__}: {e})") from None
    if not docs:
        raise BitftError(f"{path} has no examples")
    return docs


# ----------------------------------------------------------------------------- scoring

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's _encode_pair: context and continuation token ids (no special tokens)."""
    if context == "":  # the harness scores such a continuation after the end-of-text token
        eos = tokenizer.eos_token_id
        return [eos if eos is not None else 0], tokenizer(continuation, add_special_tokens=False).input_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return whole[:len(ctx)], whole[len(ctx):]


def score_doc(doc: Doc, lls: list[float]) -> dict:
    """acc and acc_norm of one example from the log-likelihoods of its choices."""
    def argmax(xs):
        return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first of equals, as numpy

    pred = argmax(lls)
    pred_norm = argmax([ll / len(c) for ll, c in zip(lls, doc.choices)])
    return {"acc": float(pred == doc.gold), "acc_norm": float(pred_norm == doc.gold), "pred": pred,
            "pred_norm": pred_norm}


def mean_stderr(values: list[float]) -> float:
    """The harness's stderr of a mean: sample standard deviation (n-1) / sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


@dataclass
class TaskResult:
    name: str
    n: int
    metrics: dict = field(default_factory=dict)  # metric -> (value, stderr)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        out = {"n": self.n, "seconds": round(self.seconds, 1)}
        for k, (v, se) in self.metrics.items():
            out[k] = v
            out[f"{k}_stderr"] = se
        return out


def evaluate_task(backend, tokenizer, name: str, folder: Path, limit: int | None = None,
                  progress: bool = False) -> TaskResult:
    """Score task NAME with BACKEND (see bitft.evaluate): acc (and acc_norm where the harness reports it)."""
    import time

    from tqdm.auto import tqdm

    task = TASKS[name]
    docs = load_docs(name, folder, limit)
    t0 = time.perf_counter()
    per = {m: [] for m in task.metrics}
    for doc in tqdm(docs, desc=name, disable=not progress):
        pairs = [encode_pair(tokenizer, c, x) for c, x in doc.requests]
        lls = backend.loglikelihoods(pairs)
        s = score_doc(doc, lls)
        for m in task.metrics:
            per[m].append(s[m])
    metrics = {m: (sum(v) / len(v), mean_stderr(v)) for m, v in per.items()}
    return TaskResult(name, len(docs), metrics, time.perf_counter() - t0)
