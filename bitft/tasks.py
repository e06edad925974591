"""Zero-shot multiple-choice tasks through lm-evaluation-harness, on the hub's datasets or local files.

Each task is the harness's own task config (its YAML in lm_eval/tasks: prompt, choices, target,
metrics, preprocessing), validation split, zero-shot. Where the hub is reachable the harness loads
its own dataset; offline (or with --tasks-dir) the dataset is swapped for a local jsonl file with
the hub's fields (shipped with bitft: bitft/resources/eval): `dataset_path: json`,
`data_files: {validation: FILE}`. BoolQ's file has google/boolq's boolean `answer`; the harness's
config (super_glue) reads `label`, so label = int(answer) is added on load.

The harness builds the requests and computes the metrics; `HarnessLM` answers its loglikelihood
requests with a bitft backend (transformers or llama.cpp, see bitft.evaluate):

    score(choice) = Σ log p(continuation tokens | context tokens)

tokenized as the harness's HFLM does (`encode_pair`: trailing whitespace of the context moves to
the continuation; the pair is tokenized as one string without special tokens; the continuation is
what follows the context's own tokens; inputs longer than the model's context lose their left
end). acc: the gold choice scores highest; acc_norm: score ÷ character length of the choice;
stderr = sample standard deviation / √n. `--limit N` keeps the first N examples.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from bitft.errors import BitftError


@dataclass(frozen=True)
class LocalTask:
    name: str          # the harness's task name
    harness_yaml: str  # its config, relative to lm_eval/tasks
    filename: str      # the local jsonl file (hub fields)
    fields: tuple[str, ...]
    title: str


TASKS = {t.name: t for t in [
    LocalTask("arc_easy", "arc/arc_easy.yaml", "arc_easy_validation.jsonl", ("question", "choices", "answerKey"),
              "ARC-Easy"),
    LocalTask("arc_challenge", "arc/arc_challenge.yaml", "arc_challenge_validation.jsonl",
              ("question", "choices", "answerKey"), "ARC-Challenge"),
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag_validation_sample500_seed0.jsonl",
              ("activity_label", "ctx_a", "ctx_b", "endings", "label"), "HellaSwag"),
    LocalTask("piqa", "piqa/piqa.yaml", "piqa_validation.jsonl", ("goal", "sol1", "sol2", "label"), "PIQA"),
    LocalTask("boolq", "super_glue/boolq/default.yaml", "boolq_validation_sample500_seed0.jsonl",
              ("passage", "question"), "BoolQ"),
    LocalTask("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa_main_validation.jsonl",
              ("question_stem", "choices", "answerKey"), "OpenBookQA"),
    LocalTask("winogrande", "winogrande/default.yaml", "winogrande_xl_validation.jsonl",
              ("sentence", "option1", "option2", "answer"), "WinoGrande"),
]}


# The BitNet b1.58 papers' table: PPL | ARCe | ARCc | HS | BQ | OQ | PQ | WGe | Avg, accuracies in
# percent, `acc` for every task (their lm-eval runs), Avg over the tasks shown.
SEED_COLUMNS = {"arc_easy": "ARCe", "arc_challenge": "ARCc", "hellaswag": "HS", "boolq": "BQ",
                "openbookqa": "OQ", "piqa": "PQ", "winogrande": "WGe"}


def seed_row(ppl: float | None, tasks: dict) -> dict:
    """{PPL, ARCe, ..., WGe, Avg} from a perplexity and {task: {acc, ...}}; None where not run."""
    row = {"PPL": ppl}
    accs = []
    for name, col in SEED_COLUMNS.items():
        acc = tasks[name]["acc"] * 100 if name in tasks else None
        row[col] = acc
        if acc is not None:
            accs.append(acc)
    row["Avg"] = sum(accs) / len(accs) if accs else None
    return row


def seed_table(rows: dict[str, dict], drop_empty: bool = False) -> str:
    """A markdown table in the seeds' format from {label: seed_row(...)} (DROP_EMPTY: without the
    columns no row has)."""
    cols = ["PPL", *SEED_COLUMNS.values(), "Avg"]
    if drop_empty:
        cols = [c for c in cols if any(row[c] is not None for row in rows.values())]
    out = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, row in rows.items():
        cells = ["–" if row[c] is None else (f"{row[c]:.2f}" if c == "PPL" else f"{row[c]:.1f}") for c in cols]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


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


def check_task_file(name: str, folder: Path) -> Path:
    """The task's local file, every line checked (JSON, the hub fields the harness reads)."""
    task = TASKS[name]
    path = Path(folder) / task.filename
    if not path.is_file():
        raise BitftError(f"{name}: {path} not found: pass --tasks-dir with the folder of the local "
                         f"task files ({task.filename}, hub fields)")
    rows = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BitftError(f"{path}:{lineno} is not valid JSON ({e})") from None
            missing = [k for k in task.fields + (("label",) if name == "boolq" and "answer" not in row else ())
                       if k not in row]
            if missing:
                raise BitftError(f"{path}:{lineno} lacks {', '.join(missing)}: {name} expects the hub "
                                 f"fields {', '.join(task.fields)}")
            rows += 1
    if not rows:
        raise BitftError(f"{path} has no examples")
    return path


def _boolq_label(dataset):
    if "label" in dataset.column_names:
        return dataset
    return dataset.map(lambda d: {"label": int(bool(d["answer"]))})


def harness_config(name: str, folder: Path | None) -> dict:
    """The harness's config of task NAME, reading the local file in FOLDER instead of the hub (None: the hub)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    task = TASKS[name]
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / task.harness_yaml, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(validation_split="validation", test_split=None, num_fewshot=0)
    if folder is None:
        return cfg
    cfg.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {"validation": str(check_task_file(name, folder))}},
               training_split=None, fewshot_split=None)
    if name == "boolq":
        cfg["process_docs"] = _boolq_label
        cfg["metric_list"] = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]  # its defaults, said
    return cfg


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's HFLM._encode_pair: context and continuation token ids (no special tokens)."""
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


def _harness_lm():
    from lm_eval.api.model import LM

    class HarnessLM(LM):
        """The harness's model interface, answered by a bitft backend (loglikelihood requests only).

        Not the harness's HFLM for transformers: one request path for both back ends keeps the
        transformers and llama.cpp figures comparable token for token (same pairs, same truncation)."""

        def __init__(self, backend, tokenizer, progress: bool = False, desc: str = "examples"):
            super().__init__()
            self.backend, self.tokenizer, self.progress, self.desc = backend, tokenizer, progress, desc

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            from tqdm.auto import tqdm

            out = []
            # the requests of one example (its choices) are adjacent: one backend call for all of them
            groups = [list(g) for _, g in itertools.groupby(requests, key=lambda r: (r.task_name, r.doc_id))]
            for group in tqdm(groups, desc=self.desc, disable=disable_tqdm or not self.progress):
                pairs = [encode_pair(self.tokenizer, *r.args) for r in group]
                out.extend(self.backend.loglikelihoods(pairs))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("bitft eval runs multiple-choice tasks only (loglikelihood requests)")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("bitft eval runs multiple-choice tasks only (loglikelihood requests)")

    return HarnessLM


@contextlib.contextmanager
def _quiet(quiet: bool):
    """No progress bars from datasets and from the harness's request building while QUIET."""
    if not quiet:
        yield
        return
    import datasets
    import lm_eval.api.task as harness_task
    from tqdm import tqdm

    was_enabled, bar = datasets.is_progress_bar_enabled(), harness_task.tqdm
    datasets.disable_progress_bars()
    harness_task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        harness_task.tqdm = bar
        if was_enabled:
            datasets.enable_progress_bars()


def evaluate_task(backend, tokenizer, name: str, folder: Path | None, limit: int | None = None,
                  progress: bool = False) -> dict:
    """Run task NAME through the harness with BACKEND: {n, acc, acc_stderr[, acc_norm, acc_norm_stderr], seconds}."""
    import logging

    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    cfg = harness_config(name, folder)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    lm = _harness_lm()(backend, tokenizer, progress, desc=name)
    with _quiet(not progress):
        res = evaluator.simple_evaluate(model=lm, tasks=[cfg], limit=limit, log_samples=False,
                                        task_manager=TaskManager(include_defaults=False))
    metrics = res["results"][name]
    out = {"n": res["n-samples"][name]["effective"], "seconds": round(time.perf_counter() - t0, 1)}
    for m in ("acc", "acc_norm"):
        if f"{m},none" in metrics:
            out[m] = metrics[f"{m},none"]
            out[f"{m}_stderr"] = metrics[f"{m}_stderr,none"]
    return out
