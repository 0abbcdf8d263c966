import numpy as np
import pytest

from irc.data import Corpus, perplexity_windows, token_stream
from irc.errors import UserError

from tiny import tiny_tokenizer


@pytest.mark.parametrize("n, seq_len, stride", [(100, 10, None), (101, 10, 10), (57, 16, 4), (9, 16, None), (40, 8, 7)])
@pytest.mark.parametrize("bos", [None, 7])
def test_each_token_scored_at_most_once(n, seq_len, stride, bos):
    tokens = np.arange(100, 100 + n, dtype=np.int32)
    if bos is not None and stride is not None and stride > seq_len - 1:
        stride = seq_len - 1
    windows = perplexity_windows(tokens, seq_len, stride, bos)
    content = seq_len - (bos is not None)
    step = stride or content
    targets = []
    # without BOS or overlap, a window's first token has no context and is not scored
    unscored_starts = tokens[::step].tolist() if bos is None and step == content else tokens[:1].tolist() * (bos is None)
    for i, w in enumerate(windows):
        assert len(w.ids) <= seq_len
        if bos is not None:
            assert w.ids[0] == bos
        targets.extend(w.ids[w.score_from :].tolist())
        if i:  # every scored token keeps the overlap as context
            assert w.score_from >= min(content - step, len(w.ids)) + (bos is not None)
    expected = [t for t in tokens.tolist() if t not in unscored_starts]
    assert targets == expected


def test_bad_window_arguments():
    t = np.arange(10, dtype=np.int32)
    with pytest.raises(UserError, match="seq_len must be at least 2"):
        perplexity_windows(t, 1)
    with pytest.raises(UserError, match="stride must be in"):
        perplexity_windows(t, 4, stride=5)


def test_token_stream_policies_and_cache():
    tok = tiny_tokenizer()
    corpus = Corpus("t", "all", ("Paris is the capital.", "Ada and Alan."))
    none = token_stream(corpus, tok, "none")
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    a = tok("Paris is the capital.", add_special_tokens=False)["input_ids"]
    b = tok("Ada and Alan.", add_special_tokens=False)["input_ids"]
    assert none.tolist() == a + sep + b
    assert token_stream(corpus, tok, "document").tolist() == [tok.bos_token_id] + a + [tok.bos_token_id] + b
    again = token_stream(corpus, tok, "none")  # from the cache
    assert again.dtype == np.int32 and np.array_equal(again, none)
    with pytest.raises(UserError, match="unknown BOS policy"):
        token_stream(corpus, tok, "sometimes")
