"""Zero-shot tasks: lm-evaluation-harness prompt formats on the local files, scoring, the CLI."""

import json
import math

import pytest
import torch

from bitft.cli import main
from bitft.evaluate import TransformersBackend
from bitft.tasks import TASKS, Doc, encode_pair, evaluate_task, load_docs, mean_stderr, parse_tasks, score_doc
from helpers import DATA, cli_refuses, tiny_model
from test_evaluate import char_tokenizer, tiny_folder_with_tokenizer

EVAL = DATA / "eval"


def test_prompt_formats_on_the_first_rows():
    d = load_docs("arc_easy", EVAL, 1)[0]
    assert d.requests[0] == ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone")
    assert [c for _, c in d.requests] == [" cellular telephone", " television", " refrigerator", " airplane"]
    assert d.gold == 0
    d = load_docs("arc_challenge", EVAL, 1)[0]
    assert d.requests[0][0].startswith("Question: Juan and LaKeisha") and d.gold == 3

    d = load_docs("hellaswag", EVAL, 1)[0]
    assert d.requests[3] == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
                             " stands and lifts the weight over her head.")
    assert d.gold == 3

    d = load_docs("piqa", EVAL, 1)[0]
    assert d.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert d.requests[1][1].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans")
    assert d.gold == 0

    d = load_docs("boolq", EVAL, 1)[0]
    assert d.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in d.requests] == [" no", " yes"] and d.gold == 0  # answer: false
    assert TASKS["boolq"].metrics == ("acc",)

    d = load_docs("openbookqa", EVAL, 1)[0]
    assert d.requests[0] == ("Frilled sharks and angler fish live far beneath the surface of the ocean, "
                             "which is why they are known as", " Deep sea animals")
    assert d.gold == 0

    d = load_docs("winogrande", EVAL, 1)[0]  # partial evaluation: option in the context, shared suffix scored
    assert d.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                          ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert d.gold == 1 and TASKS["winogrande"].metrics == ("acc",)


def test_every_local_file_loads_whole():
    sizes = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 500, "piqa": 1838, "boolq": 500,
             "openbookqa": 500, "winogrande": 1267}
    for name, n in sizes.items():
        docs = load_docs(name, EVAL)
        assert len(docs) == n
        assert all(0 <= d.gold < len(d.requests) == len(d.choices) for d in docs)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = char_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    assert encode_pair(tok, "Answer:", " yes") == (ids("Answer:"), ids(" yes"))
    assert encode_pair(tok, "Answer: ", "yes") == (ids("Answer:"), ids(" yes"))
    assert encode_pair(tok, "", "yes") == ([tok.eos_token_id], ids("yes"))


def test_scoring_picks_the_highest_loglikelihood_and_acc_norm_divides_by_length():
    doc = Doc([("q", " a"), ("q", " bbbbbb"), ("q", " cc")], ["a", "bbbbbb", "cc"], gold=1)
    s = score_doc(doc, [-3.0, -6.0, -5.0])
    assert s["pred"] == 0 and s["acc"] == 0.0            # raw: -3 is highest
    assert s["pred_norm"] == 1 and s["acc_norm"] == 1.0  # per character: -3/1, -6/6 = -1, -5/2
    assert score_doc(doc, [-2.0, -2.0, -9.0])["pred"] == 0  # ties go to the first choice, as numpy.argmax
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3 / 4))


def test_loglikelihood_is_the_sum_over_the_continuation_tokens(tmp_path):
    model, tok = tiny_model("llama"), char_tokenizer()
    backend = TransformersBackend(model)
    pairs = [encode_pair(tok, "Question: why?\nAnswer:", f" {c}") for c in ("yes", "no", "because")]
    got = backend.loglikelihoods(pairs)  # one right-padded batch
    for (ctx, cont), ll in zip(pairs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
        by_hand = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert ll == pytest.approx(by_hand, abs=1e-4)
    # inputs longer than the context lose their left end
    short = TransformersBackend(model, max_length=8)
    ctx, cont = pairs[2]
    cut = (ctx + cont)[-9:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([cut[:-1]])).logits[0], -1)
    by_hand = sum(logp[8 - len(cont) + i, t].item() for i, t in enumerate(cont))
    assert short.loglikelihoods([(ctx, cont)])[0] == pytest.approx(by_hand, abs=1e-4)


def test_evaluate_task_counts_what_score_doc_says():
    model, tok = tiny_model("llama"), char_tokenizer()
    backend = TransformersBackend(model)
    r = evaluate_task(backend, tok, "openbookqa", EVAL, limit=4)
    docs = load_docs("openbookqa", EVAL, 4)
    scores = [score_doc(d, backend.loglikelihoods([encode_pair(tok, c, x) for c, x in d.requests])) for d in docs]
    assert r.n == 4
    assert r.metrics["acc"][0] == sum(s["acc"] for s in scores) / 4
    assert r.metrics["acc_norm"][0] == sum(s["acc_norm"] for s in scores) / 4


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
    assert main(["eval", str(folder), "--tasks", "boolq", "piqa", "--limit", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| BoolQ | 2 |" in table and "| PIQA | 2 |" in table


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
    print(f"SmolLM2 ARC-Easy, first 40: acc {r.metrics['acc'][0]:.3f}, acc_norm {r.metrics['acc_norm'][0]:.3f}")
    assert r.metrics["acc"][0] >= 0.45  # chance is 0.25: P(≥ 18 of 40 by chance) < 1e-3
