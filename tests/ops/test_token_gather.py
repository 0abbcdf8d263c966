"""``irc::token_gather``: registration, reference, autograd, export, Triton kernel.

Gather copies values, so every numeric comparison is exact (``torch.equal``).
Shape legend: N tokens, K selected tokens, D hidden.
"""

from __future__ import annotations

import pytest
import torch

from irc.ops import token_gather
from irc.ops.token_gather import token_gather_reference, token_gather_triton

from .triton_interpret import CASES, run_interpreted

GATHER = torch.ops.irc.token_gather.default

# (N, D, K): a single token, the empty selection, every token, odd and model widths.
SHAPES = [(1, 1, 1), (7, 16, 0), (7, 16, 7), (12, 65, 5), (5, 576, 3)]


def _index(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k]  # [K], unique


@pytest.mark.parametrize(("n", "d", "k"), SHAPES)
def test_opcheck(n, d, k):
    x = torch.randn(n, d, requires_grad=True)  # [N, D]
    torch.library.opcheck(GATHER, (x, _index(n, k)))


@pytest.mark.parametrize(("n", "d", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_and_reference_equal_indexing(n, d, k, dtype):
    x = torch.randn(n, d).to(dtype)  # [N, D]
    index = _index(n, k)
    want = x[index]  # [K, D]
    assert torch.equal(token_gather_reference(x, index), want)
    got = token_gather(x, index)
    assert got.shape == (k, d) and got.dtype == dtype
    assert torch.equal(got, want)


def test_forward_accepts_repeated_indices_and_noncontiguous_inputs():
    x = torch.randn(6, 10)[:, ::2]  # [N, D] with column stride 2
    index = torch.tensor([3, 3, 0, 5, 3, 1, 1])[::2]  # [K], stride 2, repeats
    assert torch.equal(token_gather(x, index), x[index])


def test_gradcheck():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)  # [N, D]
    index = _index(9, 4)
    assert torch.autograd.gradcheck(token_gather, (x, index))
    assert torch.autograd.gradgradcheck(token_gather, (x, index))


def test_backward_scatters_grad_into_zeros():
    x = torch.randn(8, 3, requires_grad=True)  # [N, D]
    index = torch.tensor([6, 1, 4])
    grad = torch.randn(3, 3)  # [K, D]
    token_gather(x, index).backward(grad)
    want = torch.zeros(8, 3)
    want[index] = grad
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize(
    ("x", "index", "match"),
    [
        (torch.randn(2, 3, 4), torch.tensor([0]), "x must be 2-D"),
        (torch.randn(4, 3), torch.tensor([0], dtype=torch.int32), "1-D int64"),
        (torch.randn(4, 3), torch.tensor([[0, 1]]), "1-D int64"),
        (torch.randn(4, 3), torch.tensor([0], device="meta"), "one device"),
    ],
    ids=["x-3d", "index-int32", "index-2d", "devices"],
)
def test_invalid_inputs_raise_value_error(x, index, match):
    with pytest.raises(ValueError, match=match):
        token_gather(x, index)


def test_triton_entry_rejects_wrong_out_buffer():
    pytest.importorskip("triton", reason="triton is not installed; the kernel entry needs it")
    with pytest.raises(ValueError, match="out must be"):
        token_gather_triton(torch.randn(4, 3), torch.tensor([1]), out=torch.empty(2, 3))


class _Selected(torch.nn.Module):
    """Gathers the tokens a mask selects: K is data-dependent."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        index = torch.nonzero(mask).squeeze(-1)  # [K]
        return token_gather(x, index) * 2.0  # [K, D]


def test_export_keeps_one_node_with_data_dependent_index():
    x = torch.randn(10, 8)  # [N, D]
    mask = torch.rand(10) > 0.5  # [N]
    ep = torch.export.export(_Selected(), (x, mask))
    for graph in (ep.graph, ep.run_decompositions().graph):
        targets = [node.target for node in graph.nodes]
        assert targets.count(GATHER) == 1
    # A different number of selected tokens runs through the same program.
    for other in (mask, ~mask, torch.zeros(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool)):
        assert torch.equal(ep.module()(x, other), _Selected()(x, other))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    try:
        return run_interpreted("gather")
    except LookupError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_under_interpreter_equals_reference(interpreted, case):
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "d", "k"), [*SHAPES, (4096, 2048, 1000)])
def test_cuda_op_equals_reference(n, d, k, dtype):
    x = torch.randn(n, d, device="cuda").to(dtype)  # [N, D]
    index = _index(n, k).cuda()
    assert torch.equal(token_gather(x, index), token_gather_reference(x, index))
