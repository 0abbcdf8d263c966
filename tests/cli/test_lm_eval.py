"""``irc lm-eval``: the harness's table and results with irc's facts, offline tasks, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
from routed_helpers import tiny_loaded

from irc.cli import main

from tiny import sample_text


@pytest.fixture
def corpus(tmp_path):
    """Four documents of prose: paragraphs long enough for last-word passages."""
    sentence = sample_text().strip()
    docs = ["\n\n".join(f"{sentence} Part {i} {p} ends with the lazy dog." for p in range(3)) for i in range(4)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def mc_file(tmp_path):
    path = tmp_path / "capitals.jsonl"
    rows = [{"question": "What is the capital of France?", "choices": ["Paris", "Berlin"], "label": 0},
            {"question": "What is the capital of Germany?", "choices": ["Paris", "Berlin", "Ada"], "label": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lm_eval_on_a_tiny_model(tiny_dirs, corpus, mc_file, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval", reason="needs the irc[eval] extra: pip install -e '.[eval]'")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    rc = main(["lm-eval", str(tiny_dirs["llama"]), "--tasks", f"irc_wiki_rolling,irc_lastword,mc:{mc_file}",
               "--data", str(corpus), "--limit", "3", "--dtype", "fp32", "--batch-size", "2",
               "--output", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    tasks = result["results"]
    assert set(tasks) == {"irc_wiki_rolling", "irc_lastword", "irc_mc_capitals"}
    assert tasks["irc_wiki_rolling"]["word_perplexity,none"] > 1
    assert tasks["irc_wiki_rolling"]["sample_len"] == 3  # --limit
    assert 0 <= tasks["irc_lastword"]["acc,none"] <= 1
    assert 0 <= tasks["irc_mc_capitals"]["acc,none"] <= 1
    assert result["irc"]["kind"] == "base" and result["irc"]["batch_size"] == 2
    assert "|irc_wiki_rolling|" in captured.err.replace(" ", "")  # the harness's table, on stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["irc_lastword"] == tasks["irc_lastword"]
    import os

    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"


def test_lm_eval_routed_facts_and_table(tiny_dirs, corpus, tmp_path, capsys, monkeypatch):
    """A routed model: the table on stdout, its achieved sparsity and FLOPs saved in the verdict."""
    pytest.importorskip("lm_eval", reason="needs the irc[eval] extra: pip install -e '.[eval]'")
    from routed_helpers import randomize_routing

    import irc
    from irc.plan import RoutingPlan

    routed = irc.route(irc.load_model(str(tiny_dirs["qwen2"]), dtype="fp32"), RoutingPlan(lff_rank=16, n_sink=2))
    randomize_routing(routed)
    routed.save(tmp_path / "routed")
    rc = main(["lm-eval", str(tmp_path / "routed"), "--tasks", "irc_lastword", "--data", str(corpus),
               "--limit", "4", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "|irc_lastword" in out and "acc" in out
    assert "routed      informed: sparsity" in out
    assert out.strip().splitlines()[-1].startswith("PASSED lm-eval ")
    assert "flops_saved=" in out.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
    (["--tasks", "mc:/no/such.jsonl"], "no such multiple-choice file"),
    (["--tasks", ""], "--tasks is empty"),
    (["--tasks", "irc_lastword", "--limit", "0"], "--limit must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dirs, corpus, capsys, argv, message):
    pytest.importorskip("lm_eval", reason="needs the irc[eval] extra: pip install -e '.[eval]'")
    assert main(["lm-eval", str(tiny_dirs["llama"]), "--data", str(corpus), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_model_is_one_line(corpus, capsys):
    pytest.importorskip("lm_eval", reason="needs the irc[eval] extra: pip install -e '.[eval]'")
    assert main(["lm-eval", "/no/such/model", "--tasks", "irc_lastword", "--data", str(corpus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no such model: /no/such/model")


def test_without_lm_eval_the_install_command_is_printed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ImportError
    assert main(["lm-eval", "smollm2-135m", "--tasks", "irc_lastword"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lm-eval is not installed: pip install 'lm-eval" in err[0]


def test_tiny_loaded_is_served_directly():
    pytest.importorskip("lm_eval", reason="needs the irc[eval] extra: pip install -e '.[eval]'")
    from irc.eval.lm_eval import IrcLM

    lm = IrcLM(tiny_loaded("llama"), max_length=32)
    assert lm.kind == "base" and lm.facts()["routed"] is False


@pytest.mark.slow
def test_lm_eval_on_smollm2_lastword(capsys):
    """The real model on the real held-out wiki passages (5 of them: about a minute)."""
    pytest.importorskip("lm_eval", reason="needs the irc[eval] extra: pip install -e '.[eval]'")
    assert main(["lm-eval", "smollm2-135m", "--tasks", "irc_lastword", "--limit", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lastword = result["results"]["irc_lastword"]
    assert lastword["sample_len"] == 5 and 0 <= lastword["acc,none"] <= 1
    assert 1 < lastword["perplexity,none"] < 1e6  # a trained model: far below the vocabulary's 49,152 per token
