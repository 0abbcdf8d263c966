"""irc convert on a tiny model: resume equals an uninterrupted run; failures leave no OUT."""

import json

import pytest
from safetensors.torch import load_file

from irc.cli import main
from irc.errors import UserError
from irc.train.convert import ConvertConfig, convert


class Interrupt(Exception):
    pass


def _config(corpus, **kw):
    base = dict(sparsity=0.5, dtype="fp32", lff_rank=8, n_sink=2, lff_seq_len=64, lff_windows=4,
                init_windows=2, router_steps=8, batch_size=2, train_seq_len=32, calib_windows=2,
                checkpoint_every=3, eval_seq_len=64, eval_tokens=640,
                data=str(corpus / "train.jsonl"), eval_data=str(corpus / "heldout.jsonl"))
    return ConvertConfig(**{**base, **kw})


def _same_outputs(a, b):
    sa, sb = load_file(a / "routing.safetensors"), load_file(b / "routing.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (sa[k] == sb[k]).all(), k
    ea, eb = (json.loads((d / "irc.json").read_text())["evaluation"] for d in (a, b))
    assert ea["perplexity"] == eb["perplexity"]


@pytest.mark.parametrize("stop_at", ["routers-checkpoint", "lff", "calibrate"])
def test_resume_equals_an_uninterrupted_run(tiny_dirs, tiny_corpus, tmp_path, stop_at):
    model = str(tiny_dirs["llama"])
    config = _config(tiny_corpus)
    whole = tmp_path / "whole"
    convert(model, whole, config, show_progress=False, log=lambda s: None)

    def interrupt(name, info):
        if name == stop_at and info.get("step", 3) == 3:
            raise Interrupt(name)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        convert(model, out, config, show_progress=False, log=lambda s: None, on_stage=interrupt)
    assert not out.exists()  # nothing that looks complete
    assert (tmp_path / ".resumed.irc-work").is_dir()
    convert(model, out, config, resume=True, show_progress=False, log=lambda s: None)
    _same_outputs(whole, out)
    assert not (tmp_path / ".resumed.irc-work").exists()


def test_resume_refuses_another_configuration(tiny_dirs, tiny_corpus, tmp_path):
    model = str(tiny_dirs["llama"])
    out = tmp_path / "o"

    def stop(name, info):
        raise Interrupt(name)

    with pytest.raises(Interrupt):
        convert(model, out, _config(tiny_corpus), show_progress=False, log=lambda s: None, on_stage=stop)
    from irc.errors import UserError

    with pytest.raises(UserError, match="belong to another configuration"):
        convert(model, out, _config(tiny_corpus, seed=1), resume=True, show_progress=False, log=lambda s: None)


def test_failed_convert_leaves_no_out(tiny_dirs, tiny_corpus, tmp_path):
    from irc.errors import UserError

    out = tmp_path / "o"
    with pytest.raises(UserError, match="training data holds"):
        convert(str(tiny_dirs["llama"]), out, _config(tiny_corpus, lff_windows=10_000), show_progress=False,
                log=lambda s: None)
    assert not out.exists()


@pytest.mark.parametrize("variant", ["skip", "mod", "static"])
def test_baselines_convert(tiny_dirs, tiny_corpus, tmp_path, variant):
    out = tmp_path / variant
    summary = convert(str(tiny_dirs["qwen2"]), out, _config(tiny_corpus, variant=variant, sparsity=0.5),
                      show_progress=False, log=lambda s: None)
    ev = summary["evaluation"]
    assert ev["perplexity"] > 1 and ev["flops_per_token"]["routed"] < ev["flops_per_token"]["dense"]
    if variant == "static":
        assert json.loads((out / "irc.json").read_text())["plan"]["layers"] in ([0], [1])
        assert ev["sparsity"]["overall"] == pytest.approx(0.5)
    else:
        assert ev["sparsity"]["overall"] == pytest.approx(0.5, abs=0.1)


def test_cli_convert_then_eval_with_the_dial(tiny_dirs, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "routed"
    args = ["convert", str(tiny_dirs["llama"]), "-o", str(out), "--sparsity", "0.4", "--dtype", "fp32",
            "--data", str(tiny_corpus / "train.jsonl"), "--eval-data", str(tiny_corpus / "heldout.jsonl"),
            "--eval-tokens", "1024", "--router-steps", "4", "--lff-rank", "8"]
    # the quick preset's windows of 1024 are longer than the tiny model's 512 positions
    assert main(args) == 2
    assert "longer than the model's 512 positions" in capsys.readouterr().err
    assert not out.exists()
    config = _config(tiny_corpus, sparsity=0.4)
    convert(str(tiny_dirs["llama"]), out, config, show_progress=False, log=lambda s: None)
    assert main(["eval", str(out), "--data", str(tiny_corpus / "heldout.jsonl"), "--seq-len", "64",
                 "--max-tokens", "640", "--dtype", "fp32", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["routed"] and first["sparsity"]["overall"] == pytest.approx(0.4, abs=0.1)
    assert main(["eval", str(out), "--data", str(tiny_corpus / "heldout.jsonl"), "--seq-len", "64",
                 "--max-tokens", "640", "--dtype", "fp32", "--sparsity", "0.7",
                 "--calib-data", str(tiny_corpus / "train.jsonl"), "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["sparsity"]["overall"] == pytest.approx(0.7, abs=0.1)
    assert moved["flops_per_token"]["routed"] < first["flops_per_token"]["routed"]


@pytest.mark.parametrize("routing,distill", [("train", 0.0), ("threshold", 0.5)])
def test_convert_with_lora(tiny_dirs, tiny_corpus, tmp_path, routing, distill):
    out = tmp_path / "lora"
    summary = convert(str(tiny_dirs["llama"]), out, _config(tiny_corpus, lora_steps=3, lora_rank=4,
                                                            lora_routing=routing, lora_distill=distill),
                      show_progress=False, log=lambda s: None)
    lora = summary["training"]["lora"]
    assert (lora["steps"], lora["routing"], lora["distill"]) == (3, routing, distill)
    manifest = json.loads((out / "irc.json").read_text())
    assert manifest["plan"]["lora_rank"] == 4
    assert any(".lora." in k for k in load_file(out / "routing.safetensors"))


def test_resume_with_other_lora_settings_keeps_the_routers(tiny_dirs, tiny_corpus, tmp_path):
    """--resume after changing only later stages' settings (here LoRA's) reuses the checkpoints
    before them and equals an uninterrupted run with the new settings; other changes are refused."""
    model = str(tiny_dirs["llama"])
    first = _config(tiny_corpus, lora_steps=3, lora_rank=4, lora_lr=1e-2)
    second = _config(tiny_corpus, lora_steps=4, lora_rank=4, lora_lr=5e-3, lora_routing="threshold")
    whole = tmp_path / "whole"
    convert(model, whole, second, show_progress=False, log=lambda s: None)

    def interrupt(name, info):
        if name == "calibrate":
            raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        convert(model, out, first, show_progress=False, log=lambda s: None, on_stage=interrupt)
    with pytest.raises(UserError, match="another configuration"):
        convert(model, out, _config(tiny_corpus, lora_steps=3, lora_rank=4, router_steps=9), resume=True,
                show_progress=False, log=lambda s: None)
    lines = []
    convert(model, out, second, resume=True, show_progress=False, log=lines.append)
    assert "stage routers: resumed from checkpoint" in lines
    assert any(line.startswith("stage lora: settings changed (lora_steps 3 → 4, lora_lr 0.01 → 0.005") for line in lines)
    _same_outputs(whole, out)


def test_bad_lora_settings_are_refused(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["convert", str(tiny_dirs["llama"]), "-o", str(out), "--lora-distill", "1.5"]) == 2
    assert "--lora-distill must be in [0, 1]" in capsys.readouterr().err
    assert not out.exists()


def test_flops_budget_convert_and_eval_dial(tiny_dirs, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "flops"
    summary = convert(str(tiny_dirs["llama"]), out, _config(tiny_corpus, sparsity=None, flops_saved=0.2),
                      show_progress=False, log=lambda s: None)
    ev = summary["evaluation"]
    assert summary["calibration"]["budget"] == "flops"
    # calibrated on held-in windows: the held-out figure lands near the target
    assert ev["flops_per_token"]["saved"] == pytest.approx(0.2, abs=0.03)
    assert summary["calibration"]["achieved_flops_saved"] == pytest.approx(0.2, abs=0.01)
    assert main(["eval", str(out), "--data", str(tiny_corpus / "heldout.jsonl"), "--seq-len", "64",
                 "--max-tokens", "640", "--dtype", "fp32", "--flops-saved", "0.3",
                 "--calib-data", str(tiny_corpus / "train.jsonl"), "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["calibration"]["achieved_flops_saved"] == pytest.approx(0.3, abs=0.01)
    assert moved["flops_per_token"]["saved"] == pytest.approx(0.3, abs=0.03)
    assert main(["eval", str(out), "--flops-saved", "0.99", "--dtype", "fp32", "--seq-len", "64",
                 "--calib-data", str(tiny_corpus / "train.jsonl")]) == 2
    assert "out of reach" in capsys.readouterr().err


def test_a_budget_is_required_and_single(tiny_corpus):
    from irc.errors import UserError

    assert _config(tiny_corpus, sparsity=None).flops_saved == 0.2  # the default budget
    with pytest.raises(UserError, match="not both"):
        _config(tiny_corpus, sparsity=0.2, flops_saved=0.2)
    with pytest.raises(UserError, match="static-lff chooses units by FLOPs"):
        _config(tiny_corpus, variant="static-lff")
    with pytest.raises(UserError, match="--fold-min-saving must be in"):
        _config(tiny_corpus, fold_min_saving=-0.01)


def test_lora_reuses_the_router_windows_where_the_stream_runs_out():
    """Router training may take the whole stream (the standard preset does on wiki:train): LoRA then
    trains on the routers' windows again, from their first, rather than on nothing."""
    import numpy as np
    import torch

    from irc.train.convert import STAGES, Job

    config = ConvertConfig(sparsity=0.5, lff_seq_len=8, lff_windows=2, init_windows=1, router_steps=10,
                           batch_size=2, train_seq_len=4, lora_steps=3)
    job = Job(config=config, source="", base=None, stream=np.arange(24 + 4 * 5), calib=None, work=None,
              log=print, show_progress=False, on_stage=lambda name, info: None)
    for stage in STAGES:
        if stage.data is not None and stage.applies(config):
            stage.data(job)
    routers, lora = job.windows["routers"], job.windows["lora"]
    assert routers.shape == (5, 4)  # 20 wanted, 5 left after the forecaster and init windows
    assert lora.shape == (6, 4)
    assert torch.equal(lora, routers[torch.arange(6) % 5])


def test_convert_folds_routes_under_the_min_saving(tiny_dirs, tiny_corpus, tmp_path):
    """``--fold-min-saving``: after ε, the units whose route saves less than S are folded plain,
    the others keep their routers (``route_saving`` at the held-in fractions the record keeps)."""
    import irc
    from irc.eval.flops import route_saving

    out = tmp_path / "decode-fold"
    S = 0.05
    summary = convert(str(tiny_dirs["llama"]), out,
                      _config(tiny_corpus, sparsity=None, flops_saved=0.2, fold_epsilon=0.05, fold_min_saving=S),
                      show_progress=False, log=lambda s: None)
    fold = summary["fold"]
    assert fold["min_saving"] == S
    routed = irc.load(out, dtype="fp32")
    fractions = fold["held_in_execute"]  # measured on the held-in windows, of lff_seq_len (64) tokens
    saving = {n: route_saving(routed.arch, routed.plan, n.rsplit("_", 1)[1], 64, f) for n, f in fractions.items()}
    dynamic = [n for n, f in fractions.items() if 0.05 < f < 0.95]
    assert sorted(fold["folded_for_saving"]) == sorted(n for n in dynamic if saving[n] < S)
    assert all(fold["folded"][n] == "plain" for n in fold["folded_for_saving"])
    assert set(routed.units) == {n for n in dynamic if saving[n] >= S}


def test_convert_refines_the_folded_model(tiny_dirs, tiny_corpus, tmp_path, capsys):
    """``--refine-steps``: after folding, LoRA trains on the folded model (the folded units' deltas
    too) and the routers are recalibrated; the stage resumes like the others; without LoRA it is refused."""
    import irc

    out = tmp_path / "refined"
    config = _config(tiny_corpus, sparsity=None, flops_saved=0.2, fold_epsilon=0.05, fold_min_saving=0.05,
                     lora_steps=2, lora_rank=4, lora_routing="threshold", refine_steps=3)
    summary = convert(str(tiny_dirs["llama"]), out, config, show_progress=False, log=lambda s: None)
    refine = summary["training"]["refine"]
    assert refine["lora"]["steps"] == 3 and refine["lora"]["routing"] == "threshold"
    assert summary["fold"]["folded"]  # something was folded, so folded units' deltas trained
    routed = irc.load(out, dtype="fp32")
    assert routed.plan.folded and any(getattr(u, "lora", None) is not None for u in routed.folded.values())
    if routed.units:
        assert refine["recalibration"]["achieved_flops_saved"] == pytest.approx(0.2, abs=0.05)
    assert main(["convert", str(tiny_dirs["llama"]), "-o", str(tmp_path / "never"), "--refine-steps", "2"]) == 2
    assert "--refine-steps trains the LoRA deltas" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
