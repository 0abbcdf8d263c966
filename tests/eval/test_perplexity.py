"""evaluate_perplexity against Hugging Face's own loss (an independent implementation)."""

import math

import numpy as np
import pytest
import torch

from irc.data import perplexity_windows
from irc.eval import evaluate_perplexity

from tiny import tiny_model
from tolerances import PPL_REL


def _hf_reference(model, tokens, seq_len, stride=None, bos=None):
    """Mean NLL from HF's `labels=` loss, window by window (-100 masks unscored targets)."""
    total, count = 0.0, 0
    for w in perplexity_windows(tokens, seq_len, stride, bos):
        ids = torch.as_tensor(w.ids, dtype=torch.long)[None]
        labels = ids.clone()
        labels[:, : w.score_from] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(ids, labels=labels).loss.item()
        total += loss * n
        count += n
    return math.exp(total / count), count


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("seq_len, stride, bos", [(32, None, None), (32, 8, None), (17, None, 1), (200, None, None)])
def test_matches_hf_loss(family, seq_len, stride, bos):
    model = tiny_model(family)
    tokens = np.random.default_rng(0).integers(3, 300, size=101).astype(np.int32)
    want, count = _hf_reference(model, tokens, seq_len, stride, bos)
    got = evaluate_perplexity(model, tokens, seq_len=seq_len, stride=stride, bos=bos)
    assert got.tokens == count
    assert got.perplexity == pytest.approx(want, rel=PPL_REL)
    assert got.forward_tokens == sum(len(w.ids) for w in perplexity_windows(tokens, seq_len, stride, bos))
    assert got.tokens_per_s > 0 and got.peak_memory_mb > 0


def test_batching_and_max_tokens_do_not_change_the_result():
    model = tiny_model("mistral")
    tokens = np.random.default_rng(1).integers(3, 300, size=300).astype(np.int32)
    one = evaluate_perplexity(model, tokens, seq_len=40, batch_size=1)
    four = evaluate_perplexity(model, tokens, seq_len=40, batch_size=4)
    assert four.perplexity == pytest.approx(one.perplexity, rel=PPL_REL)
    assert four.tokens == one.tokens == 300 - math.ceil(300 / 40)
    cut = evaluate_perplexity(model, tokens, seq_len=40, max_tokens=80)
    assert cut.tokens == 78
    assert cut.perplexity == pytest.approx(_hf_reference(model, tokens[:80], 40)[0], rel=PPL_REL)


def test_a_model_returning_plain_logits():
    model = tiny_model("qwen2")
    tokens = np.arange(3, 60, dtype=np.int32)
    wrapped = evaluate_perplexity(lambda ids: model(ids).logits, tokens, seq_len=20)
    direct = evaluate_perplexity(model, tokens, seq_len=20)
    assert wrapped.perplexity == direct.perplexity
