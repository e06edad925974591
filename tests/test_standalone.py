"""bitft on its own: shipped data found through the package, hub first and shipped offline, pickled
weights unpickled as weights only, and a wheel that evaluates SmolLM2 from an unrelated folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitft.evaluate as ev
from bitft.cli import main
from bitft.data.local import local_files
from bitft.errors import DataError
from bitft.resources import resolve_path, shipped
from bitft.tasks import TASKS, harness_config
from helpers import DATA, cli_refuses, tiny_model

REPO = Path(__file__).resolve().parents[1]
USER_DIRS = ("bitft", "recipes", "configs", "scripts")


def readme_rows() -> dict[str, str]:
    """{file: rows cell} from the table of bitft/resources/README.md."""
    rows = {}
    for line in (shipped() / "README.md").read_text().splitlines():
        m = re.match(r"\| (eval|demo)/(\S+) \| ([^|]+) \|", line)
        if m:
            rows[f"{m[1]}/{m[2]}"] = m[3].strip()
    return rows


def test_every_shipped_file_is_listed_with_its_true_row_count():
    files = {str(p.relative_to(shipped())) for p in shipped().rglob("*")
             if p.is_file() and p.suffix in (".jsonl", ".raw")}
    rows = readme_rows()
    assert files == set(rows), "bitft/resources/README.md must list exactly the shipped files"
    for name, cell in rows.items():
        n = sum(1 for line in shipped(name).read_text(encoding="utf-8").splitlines() if line.strip())
        stated = int(re.match(r"[\d,]+", cell)[0].replace(",", ""))
        assert n == stated, f"{name}: {n} non-empty lines, README says {cell}"
    for task in TASKS.values():  # every task the CLI offers has its file
        assert (shipped("eval") / task.filename).is_file()


def test_shipped_eval_files_are_the_shared_ones():
    for task in TASKS.values():
        assert (shipped("eval") / task.filename).read_bytes() == (DATA / "eval" / task.filename).read_bytes()
    assert shipped(ev.SHIPPED_WIKITEXT).read_bytes() == (DATA / "eval" / "wikitext2_test.raw").read_bytes()


def test_nothing_a_user_runs_refers_to_the_shared_folder():
    offenders = []
    for d in USER_DIRS:
        for p in (REPO / d).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".sh", ".json", ".toml") and "__pycache__" not in p.parts:
                if re.search(r"shared/data|\.\./shared|BITFT_SHARED", p.read_text(errors="replace")):
                    offenders.append(str(p.relative_to(REPO)))
    assert not offenders


def test_shipped_names_resolve_and_a_wrong_one_names_what_is_shipped():
    assert [f.name for f in local_files(["shipped:demo/pretrain"])] == [
        "c4_demo.jsonl", "c4_sample.jsonl", "python311_docs_first1MB.jsonl"]
    assert resolve_path("data/x.jsonl") == "data/x.jsonl"
    with pytest.raises(DataError, match=r"shipped:demo/nope is not shipped with bitft \(shipped: .*eval/arc_easy"):
        local_files(["shipped:demo/nope"])


def test_demo_configs_read_only_shipped_data():
    import yaml

    for name in ("warmup", "sft", "dpo"):
        cfg = yaml.safe_load((REPO / "configs" / "demo" / f"{name}.yaml").read_text())
        assert all(s.startswith("shipped:demo/") for s in cfg["dataset"])
        assert local_files(cfg["dataset"])


# ----------------------------------------------------------------------------- hub first, shipped offline
def test_offline_ppl_text_is_the_shipped_copy_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text, source = ev.ppl_text(None)
    assert source == "shipped:eval/wikitext2_test.raw" and text.startswith(" = Robert Boulter = \n")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bitft eval: hub not used (HF_HUB_OFFLINE=1): WikiText-2 test from the copy shipped with bitft"]


def test_with_a_hub_the_hub_split_is_used_rows_joined_as_shipped(monkeypatch, capsys):
    import datasets

    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        return {"text": ["", " = Robert Boulter = \n", "", " Robert Boulter is an actor .\n"]}

    monkeypatch.setattr(ev, "hub_unavailable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    text, source = ev.ppl_text(None)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert text == " = Robert Boulter = \n Robert Boulter is an actor .\n"  # the shipped file's form
    assert source == "hub Salesforce/wikitext wikitext-2-raw-v1 test" and capsys.readouterr().err == ""

    def failing(*a, **k):
        raise ConnectionError("boom")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    text, source = ev.ppl_text(None)
    assert source == "shipped:eval/wikitext2_test.raw"
    assert "Salesforce/wikitext could not be loaded (ConnectionError)" in capsys.readouterr().err


def test_the_hub_is_unavailable_offline_and_when_its_host_does_not_answer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ev.hub_unavailable() == "HF_HUB_OFFLINE=1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert ev.hub_unavailable().startswith("127.0.0.1 unreachable")


def test_tasks_come_from_the_harness_hub_datasets_when_online(monkeypatch):
    monkeypatch.setattr(ev, "hub_unavailable", lambda: None)
    folder, source = ev.tasks_folder(None)
    assert folder is None and source == "hub (the harness's own datasets)"
    cfg = harness_config("arc_easy", folder)
    assert cfg["dataset_path"] == "allenai/ai2_arc" and cfg["dataset_name"] == "ARC-Easy" and cfg["num_fewshot"] == 0
    local = harness_config("arc_easy", shipped("eval"))
    assert local["dataset_path"] == "json" and local["dataset_kwargs"]["data_files"]["validation"].endswith(
        "arc_easy_validation.jsonl")
    monkeypatch.setattr(ev, "hub_unavailable", lambda: "HF_HUB_OFFLINE=1")
    assert ev.tasks_folder(None) == (shipped("eval"), "shipped:eval")
    assert ev.tasks_folder("some/dir") == (Path("some/dir"), "some/dir")


def test_bitft_eval_offline_states_the_data_it_used(tmp_path, capsys, monkeypatch):
    from test_evaluate import tiny_folder_with_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    capsys.readouterr()
    assert main(["eval", str(folder), "--ppl", "--seqlen", "64", "--limit", "1", "--tasks", "arc_easy", "--limit", "2",
                 "--json", "--no-progress"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["perplexity"]["data"] == "shipped:eval/wikitext2_test.raw"
    assert result["tasks_data"] == "shipped:eval" and result["tasks"]["arc_easy"]["n"] == 2
    assert out.err.count("hub not used (HF_HUB_OFFLINE=1)") == 2


# ----------------------------------------------------------------------------- pickled weights
def test_a_pytorch_model_bin_folder_converts(tmp_path, tokens):
    import bitft

    model = tiny_model("llama")
    src = tmp_path / "bin"
    src.mkdir()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--lambda", "0"]) == 0
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert bitft.get_lambda(out) == 0.0
    with torch.no_grad():
        assert torch.equal(out(tokens).logits, model(tokens).logits)


class NotATensor:
    def __reduce__(self):
        return (os.getcwd, ())  # a harmless call, but a call: weights_only refuses it


def test_a_pickle_with_more_than_tensors_is_refused_in_one_line(tmp_path, capsys):
    model = tiny_model("llama")
    src = tmp_path / "bad"
    src.mkdir()
    model.config.save_pretrained(src)
    state = dict(model.state_dict())
    state["extra"] = NotATensor()
    torch.save(state, src / "pytorch_model.bin")
    err = cli_refuses(capsys, tmp_path, ["convert", src, "-o", tmp_path / "out"])
    assert "unpickles weights only" in err and "safetensors" in err
    assert not (tmp_path / "out").exists()


def test_a_hub_repo_without_safetensors_downloads_its_pytorch_model_bin(tmp_path, monkeypatch):
    import huggingface_hub

    from bitft.sources import resolve_source

    repo = tmp_path / "snap"
    repo.mkdir()
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append(allow_patterns)
        if any("bin" in p for p in allow_patterns):
            (repo / "pytorch_model.bin").write_bytes(b"")
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_source("org/old-model") == repo
    assert "*.safetensors" in calls[0] and "pytorch_model*.bin" in calls[1] and len(calls) == 2


# ----------------------------------------------------------------------------- the wheel, from anywhere
def _eval_json(command, cwd, *args, pythonpath="") -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", TORCHDYNAMO_DISABLE="1", PYTHONPATH=pythonpath)
    r = subprocess.run([*command, "eval", "smollm2", *args, "--json", "--no-progress"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.slow
def test_the_wheel_installed_elsewhere_evaluates_smollm2_like_the_development_install(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("bitft-*.whl")
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies from the development environment (a path line: its own .pth files, the
    # editable bitft among them, are not processed), bitft itself from the wheel
    dev_site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dev-deps.pth").write_text(dev_site + "\n")
    subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(vpy), "-c", "import bitft; print(bitft.__file__)"], cwd=elsewhere, check=True,
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH="")).stdout.strip()
    assert where.startswith(site), where

    # the development install: this checkout's code, run from the repository
    dev_cmd = [sys.executable, "-c", "import sys; from bitft.cli import main; sys.exit(main(sys.argv[1:]))"]
    args = ["--ppl", "--windows", "1", "--tasks", "arc_easy", "--limit", "5"]  # one load of SmolLM2 per install
    installed = _eval_json([str(venv / "bin" / "bitft")], elsewhere, *args)
    dev = _eval_json(dev_cmd, REPO, *args, pythonpath=str(REPO))
    assert installed["perplexity"]["data"] == dev["perplexity"]["data"] == "shipped:eval/wikitext2_test.raw"
    assert installed["perplexity"]["ppl"] == dev["perplexity"]["ppl"]
    print(f"ppl installed {installed['perplexity']['ppl']:.4f}, development {dev['perplexity']['ppl']:.4f}")
    assert installed["tasks_data"] == dev["tasks_data"] == "shipped:eval"
    assert installed["tasks"]["arc_easy"] == {**dev["tasks"]["arc_easy"], "seconds": installed["tasks"]["arc_easy"]["seconds"]}
    print(f"arc_easy installed {installed['tasks']['arc_easy']}, development {dev['tasks']['arc_easy']}")
