"""``merged_lora``: adapted weights as one plain parameter for an export, and put back after."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from irc.nn.lora import LoRADelta, merged_lora


class _Part(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return torch.nn.functional.linear(x, self.proj.weight)


def _shared_parts():
    """Two parts owning the same weight, one delta registered on both (as ``attach_lora`` does)."""
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4, bias=False), nn.Linear(6, 4, bias=False)
    b.weight = a.weight
    delta = LoRADelta(4, 6, rank=2, alpha=4.0, dtype=torch.float32)
    with torch.no_grad():
        delta.B.normal_()
    for m in (a, b):
        parametrize.register_parametrization(m, "weight", delta, unsafe=True)
    return nn.ModuleList([_Part(a), _Part(b)]), delta


def test_merged_weight_is_one_parameter_shared_by_the_parts():
    parts, delta = _shared_parts()
    original = parts[0].proj.parametrizations.weight.original
    expected = original + delta.scale * (delta.B @ delta.A)
    with merged_lora(parts):
        w0, w1 = parts[0].proj.weight, parts[1].proj.weight
        assert isinstance(w0, nn.Parameter) and w0 is w1  # no product left to trace, one tensor for both
        torch.testing.assert_close(w0, expected)
        # a trace of the part sees the merged weight as an input, with no matmul of B and A
        ep = torch.export.export(parts[0], (torch.randn(3, 6),), strict=False)
        ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert ops == ["aten.linear.default"], ops


def test_everything_is_put_back():
    parts, delta = _shared_parts()
    plist = parts[0].proj.parametrizations.weight
    original, keys = plist.original, parts.state_dict().keys()
    with merged_lora(parts):
        pass
    assert plist.original is original and plist[0] is delta
    assert parts.state_dict().keys() == keys
    before = parts[1].proj.weight.detach().clone()
    with torch.no_grad():
        delta.B.add_(1.0)  # the delta is live again on both parts
    assert not torch.equal(parts[1].proj.weight, before)
    torch.testing.assert_close(parts[0].proj.weight, parts[1].proj.weight)


def test_put_back_after_an_error():
    parts, delta = _shared_parts()
    plist = parts[0].proj.parametrizations.weight
    original = plist.original
    try:
        with merged_lora(parts):
            raise RuntimeError("export failed")
    except RuntimeError:
        pass
    assert plist.original is original and plist[0] is delta
