"""``irc.nn.margin``: one token's decision in Python floats equals ``_decide``'s tensor ops, bit for bit."""

import pytest
import torch

from irc.nn.margin import difference, executes


def _reference(e: torch.Tensor, a: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``RoutedUnit._decide``'s threshold decision, elementwise."""
    return ((e - a).float() - theta) >= 0


def _cases(dtype, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-12, 12, (n,), generator=g).float())
    e = (torch.randn(n, generator=g) * scale).to(dtype)
    a = (torch.randn(n, generator=g) * scale * torch.exp2(torch.randint(-8, 8, (n,), generator=g).float())).to(dtype)
    # thresholds on and around the low-precision difference: ties, one fp32 ulp either side,
    # the fp32 difference (which the narrow dtype rounds away), and random values
    d_low = (e - a).float()
    d_32 = e.float() - a.float()
    ulp = torch.nextafter(d_low, torch.full_like(d_low, float("inf"))) - d_low
    pick = torch.randint(0, 5, (n,), generator=g)
    theta = torch.where(pick == 0, d_low, torch.where(pick == 1, d_low + ulp, torch.where(
        pick == 2, d_low - ulp, torch.where(pick == 3, d_32, torch.randn(n, generator=g)))))
    return e, a, theta.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_executes_equals_the_tensor_decision(dtype):
    e, a, theta = _cases(dtype)
    want = _reference(e, a, theta).tolist()
    got = [executes(x, y, t, dtype) for x, y, t in zip(e.tolist(), a.tolist(), theta.tolist(), strict=True)]
    assert got == want
    # the cases include decisions that an fp32 subtraction of narrow logits would get wrong
    if dtype != torch.float32:
        naive = ((e.float() - a.float()) - theta >= 0).tolist()
        assert sum(n != w for n, w in zip(naive, want, strict=True)) > 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_difference_is_the_tensor_difference(dtype):
    e, a, _ = _cases(dtype, n=5000, seed=1)
    want = (e - a).float().tolist()
    assert [difference(x, y, dtype) for x, y in zip(e.tolist(), a.tolist(), strict=True)] == want


def test_far_apart_logits_take_the_fp32_subtraction():
    e, a = torch.tensor([2.0 ** 40, 1.0 + 2.0 ** -20]), torch.tensor([3.0, -(2.0 ** 31)])
    for x, y in zip(e.tolist(), a.tolist(), strict=True):
        assert difference(x, y, torch.float32) == (torch.tensor(x) - torch.tensor(y)).item()
