"""Zero-shot tasks: the harness's task configs on the local files, bitft's backends answering, the CLI."""

import json
import math

import pytest
import torch

import bitft.tasks
from bitft.cli import main
from bitft.evaluate import TransformersBackend
from bitft.tasks import TASKS, encode_pair, evaluate_task, parse_tasks
from helpers import DATA, cli_refuses, tiny_model
from test_evaluate import char_tokenizer, tiny_folder_with_tokenizer

EVAL = DATA / "eval"


class LengthBackend:
    """Scores a continuation −(its number of tokens): with a character tokenizer the shortest choice
    wins acc, and acc_norm (÷ characters of the choice, without the leading space) the longest."""

    def loglikelihoods(self, pairs):
        return [(-float(len(cont)), False) for _, cont in pairs]


def requests_of(monkeypatch, name, limit):
    """The (context, continuation) strings the harness asks bitft to score for the first LIMIT examples."""
    seen = []
    real = bitft.tasks.encode_pair

    def recording(tok, ctx, cont):
        seen.append((ctx, cont))
        return real(tok, ctx, cont)

    monkeypatch.setattr(bitft.tasks, "encode_pair", recording)
    r = evaluate_task(LengthBackend(), char_tokenizer(), name, EVAL, limit=limit)
    assert r["n"] == limit
    return seen, r


def test_prompt_formats_on_the_first_rows(monkeypatch):
    reqs, _ = requests_of(monkeypatch, "arc_easy", 1)
    assert reqs[0] == ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone")
    assert [c for _, c in reqs] == [" cellular telephone", " television", " refrigerator", " airplane"]
    reqs, _ = requests_of(monkeypatch, "arc_challenge", 1)
    assert reqs[0][0].startswith("Question: Juan and LaKeisha")

    reqs, _ = requests_of(monkeypatch, "hellaswag", 1)
    assert reqs[3] == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
                       " stands and lifts the weight over her head.")

    reqs, _ = requests_of(monkeypatch, "piqa", 1)
    assert reqs[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert reqs[1][1].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans")

    reqs, r = requests_of(monkeypatch, "boolq", 1)  # google/boolq's `answer` (false) read as label 0
    assert reqs[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in reqs] == [" no", " yes"]
    assert r["acc"] == 1.0 and "acc_norm" not in r  # " no" is the shorter choice, and the gold one

    reqs, _ = requests_of(monkeypatch, "openbookqa", 1)
    assert reqs[0] == ("Frilled sharks and angler fish live far beneath the surface of the ocean, "
                       "which is why they are known as", " Deep sea animals")

    reqs, r = requests_of(monkeypatch, "winogrande", 1)  # partial evaluation: option in the context, shared suffix scored
    assert reqs == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert r["acc"] == 0.0 and "acc_norm" not in r  # equal scores go to the first option; the gold is the second


def test_gold_answers_and_both_metrics_from_the_local_file():
    """acc / acc_norm on ARC-Easy's first 50 rows, recomputed from the jsonl by hand."""
    rows = [json.loads(line) for line in (EVAL / "arc_easy_validation.jsonl").read_text().splitlines()[:50]]
    acc, acc_norm = [], []
    for row in rows:
        texts, gold = row["choices"]["text"], row["choices"]["label"].index(row["answerKey"])
        tok_lens = [len(" " + t) for t in texts]  # one token per character
        acc.append(float(tok_lens.index(min(tok_lens)) == gold))
        per_char = [-n / len(t) for n, t in zip(tok_lens, texts)]
        acc_norm.append(float(per_char.index(max(per_char)) == gold))
    r = evaluate_task(LengthBackend(), char_tokenizer(), "arc_easy", EVAL, limit=50)
    assert r["n"] == 50
    assert r["acc"] == pytest.approx(sum(acc) / 50) and r["acc_norm"] == pytest.approx(sum(acc_norm) / 50)
    sd = lambda xs: math.sqrt(sum((x - sum(xs) / 50) ** 2 for x in xs) / 49 / 50)  # noqa: E731
    assert r["acc_stderr"] == pytest.approx(sd(acc)) and r["acc_norm_stderr"] == pytest.approx(sd(acc_norm))
    assert 0 < r["acc"] < 1 and r["acc"] != r["acc_norm"]  # the check can tell the two apart


def test_every_local_file_loads_whole():
    sizes = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 500, "piqa": 1838, "boolq": 500,
             "openbookqa": 500, "winogrande": 1267}
    for name, n in sizes.items():
        assert evaluate_task(LengthBackend(), char_tokenizer(), name, EVAL)["n"] == n


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = char_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    assert encode_pair(tok, "Answer:", " yes") == (ids("Answer:"), ids(" yes"))
    assert encode_pair(tok, "Answer: ", "yes") == (ids("Answer:"), ids(" yes"))
    assert encode_pair(tok, "", "yes") == ([tok.eos_token_id], ids("yes"))


def test_loglikelihood_is_the_sum_over_the_continuation_tokens(tmp_path):
    model, tok = tiny_model("llama"), char_tokenizer()
    backend = TransformersBackend(model)
    pairs = [encode_pair(tok, "Question: why?\nAnswer:", f" {c}") for c in ("yes", "no", "because")]
    got = backend.loglikelihoods(pairs)  # one right-padded batch
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
        by_hand = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert ll == pytest.approx(by_hand, abs=1e-4)
        assert greedy == all(logp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
    greedy_cont = [int(model(torch.tensor([pairs[0][0]])).logits[0, -1].argmax())]
    assert backend.loglikelihoods([(pairs[0][0], greedy_cont)])[0][1] is True
    # inputs longer than the context lose their left end
    short = TransformersBackend(model, max_length=8)
    ctx, cont = pairs[2]
    cut = (ctx + cont)[-9:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([cut[:-1]])).logits[0], -1)
    by_hand = sum(logp[8 - len(cont) + i, t].item() for i, t in enumerate(cont))
    assert short.loglikelihoods([(ctx, cont)])[0][0] == pytest.approx(by_hand, abs=1e-4)


def test_parse_tasks():
    assert parse_tasks(["all"]) == list(TASKS)
    assert parse_tasks(["arc-easy,piqa", "piqa", "BoolQ"]) == ["arc_easy", "piqa", "boolq"]


def test_cli_tasks_json_and_table(tmp_path, capsys):
    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    capsys.readouterr()
    assert main(["eval", str(folder), "--tasks", "all", "--limit", "2", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["tasks"]) == list(TASKS)
    for name, r in out["tasks"].items():
        assert r["n"] == 2 and 0 <= r["acc"] <= 1
        assert ("acc_norm" in r) == (name not in ("boolq", "winogrande"))
    assert "perplexity" not in out
    # the seeds' summary: acc in percent for every task, Avg over them, no PPL
    summary = out["summary"]
    assert list(summary) == ["PPL", "ARCe", "ARCc", "HS", "BQ", "OQ", "PQ", "WGe", "Avg"]
    assert summary["PPL"] is None and summary["PQ"] == pytest.approx(100 * out["tasks"]["piqa"]["acc"])
    assert summary["Avg"] == pytest.approx(sum(100 * r["acc"] for r in out["tasks"].values()) / 7)
    assert main(["eval", str(folder), "--tasks", "boolq", "piqa", "--limit", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| BoolQ | 2 |" in table and "| PIQA | 2 |" in table
    assert "| model | PPL | ARCe | ARCc | HS | BQ | OQ | PQ | WGe | Avg |" in table
    row = next(line for line in table.splitlines() if line.startswith(f"| {folder.name} |"))
    assert row.split(" | ")[1:4] == ["–", "–", "–"]  # no PPL, ARCe, ARCc: not run


def test_task_refusals(tmp_path, capsys):
    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--tasks", "hellaswag", "squad"])
    assert "unknown task 'squad'" in err
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--tasks", "piqa", "--tasks-dir", tmp_path / "none"])
    assert "piqa_validation.jsonl not found" in err and "--tasks-dir" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "piqa_validation.jsonl").write_text('{"goal": "g", "sol1": "a"}\n')
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--tasks", "piqa", "--tasks-dir", bad])
    assert "lacks sol2, label" in err


@pytest.mark.smollm2
def test_smollm2_arc_easy_above_chance(smollm2):
    model, tokenizer = smollm2
    r = evaluate_task(TransformersBackend(model), tokenizer, "arc_easy", EVAL, limit=40)
    print(f"SmolLM2 ARC-Easy, first 40: acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f}")
    assert r["acc"] >= 0.45  # chance is 0.25: P(≥ 18 of 40 by chance) < 1e-3
