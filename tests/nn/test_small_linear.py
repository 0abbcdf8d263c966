"""``small_linear``: the decode step's router and forecaster products, against ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F

from irc.nn.small_linear import small_linear


@pytest.mark.parametrize("rows", [(1, 1), (3, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_equals_linear_within_rounding(rows, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, 576, generator=g).bfloat16()
    w = (torch.randn(72, 576, generator=g) / 24).bfloat16()
    b = torch.randn(72, generator=g).bfloat16() if bias else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())  # exact
    got = small_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (*rows, 72)
    # one bf16 rounding of an fp32-accumulated product: within 2^-8 relative, as F.linear's own result
    ref = F.linear(x, w, b)
    assert float(((got.double() - want).abs() / want.abs().clamp(min=1e-2)).max()) <= 2 ** -7
    assert float(((ref.double() - want).abs() / want.abs().clamp(min=1e-2)).max()) <= 2 ** -7
    assert torch._C._get_mkldnn_enabled()  # switched back on
    if rows != (1, 1):  # several rows stay with oneDNN: F.linear itself
        assert torch.equal(got, ref)


def test_fp32_is_linear_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(1, 1, 64, generator=g), torch.randn(8, 64, generator=g), torch.randn(8, generator=g)
    assert torch.equal(small_linear(x, w, b), F.linear(x, w, b))


def test_onednn_left_off_stays_off():
    x, w = torch.randn(1, 1, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    torch._C._set_mkldnn_enabled(False)
    try:
        small_linear(x, w)
        assert not torch._C._get_mkldnn_enabled()
    finally:
        torch._C._set_mkldnn_enabled(True)
