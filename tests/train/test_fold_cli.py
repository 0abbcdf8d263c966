"""``irc fold --refine-steps``: fold, then LoRA on the folded model and recalibration; bad input refused."""

import json

from routed_helpers import randomize_routing

import irc
from irc.cli import main
from irc.plan import RoutingPlan


def _routed_dir(tiny_dirs, tmp_path, lora_rank):
    routed = irc.route(irc.load_model(str(tiny_dirs["qwen3"]), dtype="fp32"),
                       RoutingPlan(lff_rank=8, n_sink=2, lora_rank=lora_rank))
    randomize_routing(routed, seed=2)
    routed.records = {"training": {"flops_saved": 0.1, "sparsity": None}}
    return routed.save(tmp_path / f"routed-r{lora_rank}")


def _args(model, out, corpus, *extra):
    return ["fold", str(model), "-o", str(out), "--dtype", "fp32", "--seq-len", "64",
            "--calib-data", str(corpus / "train.jsonl"), "--refine-batch", "2", "--refine-seq-len", "32", *extra]


def test_fold_then_refine(tiny_dirs, tiny_corpus, tmp_path, capsys):
    model = _routed_dir(tiny_dirs, tmp_path, lora_rank=4)
    out = tmp_path / "refined"
    assert main(_args(model, out, tiny_corpus, "--min-saving", "0.05", "--refine-steps", "3", "--json")) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["folded"] and record["refine"]["lora"]["steps"] == 3
    saved = json.loads((out / "irc.json").read_text())["fold"]["refine"]
    assert saved["lora"] == record["refine"]["lora"]
    before, after = irc.load(model, dtype="fp32"), irc.load(out, dtype="fp32")
    name = next(iter(after.folded))  # a folded unit's LoRA trained too
    b = dict(before.units[name].lora.named_parameters())
    a = dict(after.folded[name].lora.named_parameters())
    assert any(not (a[k] == b[k]).all() for k in a)


def test_refine_with_distillation_from_the_base_model(tiny_dirs, tiny_corpus, tmp_path, capsys, monkeypatch):
    """--refine-distill W: the loss mixes in KL to the dense base model, whose logits are computed per step."""
    import irc.train.lora_train as lora_train

    model = _routed_dir(tiny_dirs, tmp_path, lora_rank=4)
    seen = []
    real = lora_train.distill_loss
    monkeypatch.setattr(lora_train, "distill_loss", lambda logits, teacher, mask: seen.append(
        teacher.shape) or real(logits, teacher, mask))
    out = tmp_path / "distilled"
    assert main(_args(model, out, tiny_corpus, "--min-saving", "0.05", "--refine-steps", "2",
                      "--refine-distill", "0.5", "--json")) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["refine"]["distill"] == 0.5 and record["refine"]["lora"]["steps"] == 2
    assert len(seen) == 2 and all(shape[:2] == (2, 32) for shape in seen)  # a [B, T, V] teacher per step


def test_refine_refuses_a_model_without_lora(tiny_dirs, tiny_corpus, tmp_path, capsys):
    model = _routed_dir(tiny_dirs, tmp_path, lora_rank=0)
    out = tmp_path / "never"
    assert main(_args(model, out, tiny_corpus, "--refine-steps", "2")) == 2
    assert "has no LoRA deltas for --refine-steps" in capsys.readouterr().err
    assert not out.exists()
    assert main(_args(model, out, tiny_corpus, "--refine-steps", "-1")) == 2
    assert "--refine-steps must be >= 0" in capsys.readouterr().err
    assert not out.exists()
    assert main(_args(model, out, tiny_corpus, "--refine-distill", "1.5", "--refine-steps", "2")) == 2
    assert "--refine-distill must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(_args(model, out, tiny_corpus, "--refine-distill", "0.5")) == 2
    assert "it needs --refine-steps N > 0" in capsys.readouterr().err
    assert not out.exists()
