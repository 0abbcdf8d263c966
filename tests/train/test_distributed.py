"""irc convert on 2 processes (gloo, CPU, file rendezvous) equals 1 process with the same global batch.

The configuration's batch is the global batch: 2 processes take one row each of
every router-training batch, one process both rows. Routers, forecasters and
calibrated thresholds agree within ``DISTRIBUTED_ATOL`` (the summation order of
the ranks' partial sums is the only difference), and a 2-process run killed after
a router checkpoint resumes with 1 process to the same result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irc.train.convert import ConvertConfig, convert

from tolerances import DISTRIBUTED_ATOL, PPL_REL

KILLED = 3  # the exit status of a worker that "dies" after a checkpoint


def _worker(rank: int, size: int, rendezvous: str, model: str, outs: list[str], config_dict: dict, kill_at: int):
    """One rank: a whole conversion into ``outs[0]``, then one into ``outs[1]`` that dies (no cleanup,
    as a kill leaves it) right after the router checkpoint at step ``kill_at``."""
    from irc.errors import UserError
    from irc.train.convert import ConvertConfig
    from irc.train.distributed import process_group

    torch.set_num_threads(1)

    def die(name, info):
        if name == "routers-checkpoint" and info.get("step") == kill_at:
            os._exit(KILLED)

    config = ConvertConfig.from_dict(config_dict)
    with process_group(f"file://{rendezvous}", rank=rank, size=size):
        try:  # a user error met by rank 0 (OUT exists) stops every rank with rank 0's message
            convert(model, Path(outs[0]).parent, config, show_progress=False, log=lambda s: None)
        except UserError as e:
            (Path(outs[0]).parent / f"error-{rank}.txt").write_text(str(e))
        convert(model, outs[0], config, show_progress=False, log=lambda s: None)
        convert(model, outs[1], config, show_progress=False, log=lambda s: None, on_stage=die)


def _one_process(model, out, config, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker
    try:
        convert(model, out, config, show_progress=False, log=lambda s: None, **kw)
    finally:
        torch.set_num_threads(threads)


def _dist_config(corpus, **kw):
    # as tests/train/test_convert.py; router init runs batches of 1 window (one rank idles there),
    # the forecaster fit, calibration (3 windows: uneven shards) and evaluation shard by window;
    # LoRA (2 steps, as the standard preset: under the calibrated thresholds, here with distillation)
    # shards its batches as router training does
    base = dict(sparsity=0.5, dtype="fp32", lff_rank=8, n_sink=2, lff_seq_len=64, lff_windows=4,
                init_windows=2, router_steps=8, batch_size=2, train_seq_len=32, calib_windows=3,
                checkpoint_every=4, eval_seq_len=64, eval_tokens=640, lora_steps=2, lora_rank=4,
                lora_routing="threshold", lora_distill=0.5,
                data=str(corpus / "train.jsonl"), eval_data=str(corpus / "heldout.jsonl"))
    return ConvertConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tiny_dirs, tiny_corpus, tmp_path_factory):
    """One 2-process session (a whole run, then a run killed after a router checkpoint) and the
    1-process reference with the same configuration."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("dist")
    model, config = str(tiny_dirs["llama"]), _dist_config(tiny_corpus)
    outs = [root / "two", root / "killed"]
    with pytest.raises(mp.ProcessExitedException) as e:
        mp.start_processes(_worker, args=(2, str(root / "rendezvous"), model, [str(o) for o in outs],
                                          config.to_dict(), 4), nprocs=2, start_method="spawn")
    assert e.value.exit_code == KILLED
    _one_process(model, root / "one", config)
    return {"root": root, "model": model, "config": config, "one": root / "one", "two": outs[0],
            "killed": outs[1]}


def _assert_close(a, b):
    sa, sb = load_file(a / "routing.safetensors"), load_file(b / "routing.safetensors")
    assert sa.keys() == sb.keys()
    assert {"router", "forecaster", "threshold", "lora"} <= {k.split(".")[1] for k in sa}
    worst = max(sa, key=lambda k: float((sa[k].double() - sb[k].double()).abs().max()))
    assert float((sa[worst].double() - sb[worst].double()).abs().max()) <= DISTRIBUTED_ATOL, worst
    ja, jb = (json.loads((d / "irc.json").read_text()) for d in (a, b))
    assert ja["plan"] == jb["plan"]
    assert ja["calibration"]["thresholds"] == jb["calibration"]["thresholds"]
    for key in ("perplexity", "dense_perplexity"):
        assert ja["evaluation"][key] == pytest.approx(jb["evaluation"][key], rel=PPL_REL)
    assert ja["evaluation"]["sparsity"] == jb["evaluation"]["sparsity"]


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    _assert_close(runs["two"], runs["one"])
    assert not (runs["root"] / ".two.irc-work").exists()


def test_a_user_error_on_rank_0_stops_every_rank_with_its_message(runs):
    errors = [(runs["root"] / f"error-{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1] and "already exists" in errors[0]


def test_a_killed_two_process_run_resumes_on_one(runs):
    out = runs["killed"]
    assert not out.exists()
    assert (runs["root"] / ".killed.irc-work" / "routers-progress.safetensors").is_file()
    _one_process(runs["model"], out, runs["config"], resume=True)
    _assert_close(out, runs["one"])


def test_cli_nproc_relaunches_the_same_command_through_the_elastic_launcher(monkeypatch, tmp_path):
    import irc.train.distributed as distributed
    from irc.cli import main
    from irc.cli.convert import _without_nproc

    assert _without_nproc(["convert", "m", "--nproc", "2", "-o", "x", "--nproc=3"]) == ["convert", "m", "-o", "x"]
    calls = []
    monkeypatch.setattr(distributed, "launch", lambda n, argv: calls.append((n, argv)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = str(tmp_path / "o")
    assert main(["convert", "smollm2-135m", "-o", out, "--nproc", "2", "--sparsity", "0.25"]) == 0
    assert calls == [(2, ["convert", "smollm2-135m", "-o", out, "--sparsity", "0.25"])]


def test_cli_nproc_needs_a_row_of_every_batch_per_process(tmp_path, capsys):
    from irc.cli import main

    assert main(["convert", "smollm2-135m", "-o", str(tmp_path / "o"), "--nproc", "3", "--sparsity", "0.25"]) == 2
    assert "--batch-size 3" in capsys.readouterr().err
