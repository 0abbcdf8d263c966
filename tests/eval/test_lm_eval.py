"""The ``irc`` lm-eval backend: the same numbers as lm-eval's ``hf`` backend, padding that changes
nothing, the rolling-perplexity conversion to ``irc eval``, ONNX files served through ONNX Runtime."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from routed_helpers import randomize_routing, tiny_routed

from tiny import sample_text
from tolerances import FP32_REORDER, LM_EVAL_VS_HF, PPL_REL

lm_eval = pytest.importorskip("lm_eval", reason="needs the irc[eval] extra: pip install -e '.[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from irc.eval.lm_eval import IrcLM  # noqa: E402

TEXT = sample_text()


def _mc_requests() -> list[Instance]:
    """Multiple-choice shaped requests (one context, several continuations), an empty context,
    and contexts ending in a space (lm-eval moves it to the continuation)."""
    args = []
    for i, context in enumerate(["Paris is the capital of", "Numbers like 12, 345 and", "The quick brown "]):
        for choice in (" France.", " Germany", " Ada and Alan", "fox jumps"):
            args.append((context, choice))
        args.append((TEXT[: 60 + 30 * i], TEXT[60 + 30 * i : 90 + 40 * i]))
    args.append(("", "The quick brown fox"))
    return [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]


def _rolling_requests() -> list[Instance]:
    # 1, 2-3 and 5+ windows of 48 tokens: the first window, full later ones, a remainder
    return [Instance("loglikelihood_rolling", {}, (TEXT * k,), k) for k in (1, 2, 4)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loglikelihoods_equal_the_hf_backend(tiny_dirs, family):
    directory = str(tiny_dirs[family])
    hf = get_model("hf")(pretrained=directory, device="cpu", dtype="float32", max_length=48, batch_size=1)
    ours = IrcLM(directory, dtype="fp32", max_length=48, batch_size=4)
    mc = _mc_requests()
    expected, got = hf.loglikelihood(mc), ours.loglikelihood(mc)
    assert [g for _, g in got] == [g for _, g in expected]
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in expected], atol=LM_EVAL_VS_HF, rtol=0)
    rolling = _rolling_requests()
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling),
                               atol=LM_EVAL_VS_HF, rtol=0)


def test_the_registry_keeps_lm_evals_own_backends():
    from lm_eval.api.registry import model_registry

    assert "irc" in model_registry and "hf" in model_registry
    assert get_model("irc") is IrcLM


def test_padding_changes_no_routed_decision():
    """A right-padded batch of a threshold-routed model gives the log-likelihoods of one row at a
    time, and the units count the same executed tokens: padding moved no decision."""
    _, routed = tiny_routed("llama")
    requests = _mc_requests()
    one = IrcLM(routed, batch_size=1, max_length=64)
    single = one.loglikelihood(requests)
    counts_single = {n: (u.executed, u.tokens) for n, u in routed.units.items()}
    many = IrcLM(routed, batch_size=5, max_length=64)  # resets the counters
    batched = many.loglikelihood(requests)
    counts_batched = {n: (u.executed, u.tokens) for n, u in routed.units.items()}
    assert counts_batched == counts_single
    sparsity = many.facts()["achieved_sparsity"]
    assert 0.05 < sparsity < 0.95  # decisions were really made
    np.testing.assert_allclose([x for x, _ in batched], [x for x, _ in single], atol=FP32_REORDER * 10, rtol=0)
    assert many.unbatched_reason is None


def test_reset_facts_counts_only_the_requests_after_it():
    """One loaded model evaluated task by task (bench/tasks.py): after ``reset_facts`` its sparsity and
    FLOPs are those of a fresh backend that ran only the later requests."""
    _, routed = tiny_routed("llama")
    lm = IrcLM(routed, max_length=48)
    lm.loglikelihood_rolling(_rolling_requests())
    lm.reset_facts()
    lm.loglikelihood(_mc_requests())
    after = lm.facts()
    fresh = IrcLM(routed, max_length=48)  # resets the units' counters
    fresh.loglikelihood(_mc_requests())
    expected = fresh.facts()
    assert after["tokens_routed"] == expected["tokens_routed"] > 0
    for key in ("achieved_sparsity", "sparsity_by_kind", "flops_saved", "flops_seq_len"):
        assert after[key] == expected[key], key


def test_capacity_routing_runs_one_request_at_a_time():
    from irc.plan import RoutingPlan

    _, routed = tiny_routed("llama", RoutingPlan(variant="mod", lff_rank=16, n_sink=2))
    lm = IrcLM(routed, batch_size=8, max_length=64)
    assert "capacity" in lm.unbatched_reason
    lm.loglikelihood(_mc_requests()[:4])
    assert lm.forward_rows == 4


def _doc_of_whole_windows(tokenizer, max_length: int) -> str:
    """A text whose token count is a multiple of ``max_length`` (see the conversion below)."""
    words = (TEXT * 8).split()
    for n in range(len(words), 0, -1):
        text = " ".join(words[:n])
        tokens = len(tokenizer.encode(text))
        if tokens % max_length == 0 and tokens >= 3 * max_length:
            return text
    raise AssertionError("no prefix of whole windows")


def test_rolling_word_perplexity_agrees_with_irc_eval(tiny_dirs, tmp_path):
    """The conversion: lm-eval's rolling log-likelihood of a document of n tokens T, windows of
    M = max_length, equals irc eval's summed NLL over the stream [prefix] + T with
    --seq-len M+1 --stride M (same tokens scored, each with the same context: the first with the
    prefix token, then windows whose first token is the previous window's last), provided n is a
    multiple of M (lm-eval's last window takes a full M of context, irc eval's does not overlap).
    Then word_perplexity = exp(NLL / words) = token_perplexity ** (n / words)."""
    import irc
    from irc.eval import evaluate_perplexity
    from irc.eval.lm_eval_tasks import build_tasks

    M = 32
    loaded = irc.load_model(str(tiny_dirs["llama"]), dtype="fp32")
    doc = _doc_of_whole_windows(loaded.tokenizer, M)
    corpus = tmp_path / "doc.jsonl"
    corpus.write_text(__import__("json").dumps({"text": doc}) + "\n")
    include = tmp_path / "include"
    include.mkdir()
    built = build_tasks(["irc_wiki_rolling"], include, corpus=str(corpus))
    lm = IrcLM(loaded, max_length=M, batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=built.names, log_samples=False,
                                      task_manager=lm_eval.tasks.TaskManager(include_path=str(include)))
    word_ppl = results["results"]["irc_wiki_rolling"]["word_perplexity,none"]

    tokens = loaded.tokenizer.encode(doc)
    stream = np.asarray([lm.prefix_token_id, *tokens], dtype=np.int32)
    ref = evaluate_perplexity(loaded.model, stream, seq_len=M + 1, stride=M, show_progress=False)
    assert ref.tokens == len(tokens)
    words = len(re.split(r"\s+", doc))
    assert word_ppl == pytest.approx(math.exp(ref.nll * ref.tokens / words), rel=PPL_REL)
    assert word_ppl == pytest.approx(ref.perplexity ** (len(tokens) / words), rel=PPL_REL)


def test_onnx_files_are_served_through_onnx_runtime(tiny_dirs, tmp_path):
    """A threshold-routed ONNX file scores like the routed PyTorch model; it batches (per-token
    routing), generates without a cache, and a capacity file is served one request at a time."""
    import irc
    from irc.exporters.onnx import OnnxExportConfig, export_onnx
    from irc.plan import RoutingPlan

    # a base model with a real path: the ONNX manifest names it, and the tokenizer comes from it
    routed = irc.route(irc.load_model(str(tiny_dirs["llama"]), dtype="fp32"), RoutingPlan(lff_rank=16, n_sink=2))
    randomize_routing(routed)
    out = tmp_path / "m.onnx"
    export_onnx(routed, out, OnnxExportConfig(routing="threshold"), log=lambda s: None)
    ours = IrcLM(str(out), max_length=64, batch_size=4)
    assert ours.kind == "onnx" and ours.unbatched_reason is None
    torch_lm = IrcLM(routed, max_length=64, batch_size=1)
    requests = _mc_requests()[:6]
    np.testing.assert_allclose([x for x, _ in ours.loglikelihood(requests)],
                               [x for x, _ in torch_lm.loglikelihood(requests)], atol=LM_EVAL_VS_HF, rtol=0)
    text = ours.generate_until([Instance("generate_until", {}, ("Paris is", {"until": ["\n"], "max_gen_toks": 3}), 0)])
    assert isinstance(text[0], str)
    ours.model.manifest["routing"] = "capacity"
    assert "capacity" in ours._unbatched_reason()


def test_generate_until_stops_at_the_stop_string(tiny_dirs):
    lm = IrcLM(str(tiny_dirs["llama"]), dtype="fp32", max_length=64)
    free = lm.generate_until([Instance("generate_until", {}, ("The quick", {"until": [], "max_gen_toks": 8}), 0)])[0]
    stop = free[2:4] if len(free) >= 4 else None
    if not stop or not stop.strip():
        pytest.skip("the tiny model's continuation has no usable stop string")
    cut = lm.generate_until([Instance("generate_until", {}, ("The quick", {"until": [stop], "max_gen_toks": 8}), 0)])[0]
    assert cut == free.split(stop)[0]


def test_dial_and_bad_arguments_are_user_errors(tiny_dirs):
    from irc.errors import UserError

    with pytest.raises(UserError, match="apply to routed model directories"):
        IrcLM(str(tiny_dirs["llama"]), sparsity=0.3)
    with pytest.raises(UserError, match=r"sparsity must be in \[0, 1\)"):
        IrcLM(str(tiny_dirs["llama"]), sparsity="1.5")
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        IrcLM(str(tiny_dirs["llama"]), batch_size=0)
    with pytest.raises(UserError, match="unknown irc model argument"):
        IrcLM(str(tiny_dirs["llama"]), spars1ty=0.3)
    with pytest.raises(UserError):
        IrcLM("/no/such/model")
    assert torch.get_num_threads() >= 1


def test_the_dial_recalibrates_a_routed_directory(tiny_dirs, tmp_path):
    """sparsity= moves the thresholds as irc eval --sparsity does (irc.eval.routed.recalibrate)."""
    import irc
    from irc.plan import RoutingPlan

    routed = irc.route(irc.load_model(str(tiny_dirs["llama"]), dtype="fp32"), RoutingPlan(lff_rank=16, n_sink=2))
    randomize_routing(routed)
    routed.save(tmp_path / "routed")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 120)
    lm = IrcLM(str(tmp_path / "routed"), dtype="fp32", sparsity=0.6, calib_data=str(calib), max_length=64)
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT * 3,), 0)])
    facts = lm.facts()
    assert facts["requested_sparsity"] == 0.6 and facts["calibration"] is not None
    assert facts["achieved_sparsity"] == pytest.approx(0.6, abs=0.15)  # held-in calibration, other text measured
    assert 0 < facts["flops_saved"] < 1
