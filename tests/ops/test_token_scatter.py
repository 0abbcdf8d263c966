"""``irc::token_scatter``: registration, reference, autograd, export, Triton kernel.

Scatter copies values, so every numeric comparison is exact (``torch.equal``).
Shape legend: N tokens, K selected tokens, D hidden.
"""

from __future__ import annotations

import io

import pytest
import torch

from irc.ops import token_gather, token_scatter
from irc.ops.token_scatter import token_scatter_reference

from .triton_interpret import CASES, run_interpreted

GATHER = torch.ops.irc.token_gather.default
SCATTER = torch.ops.irc.token_scatter.default

# (N, D, K): a single token, the empty selection, every token, odd and model widths.
SHAPES = [(1, 1, 1), (7, 16, 0), (7, 16, 7), (12, 65, 5), (5, 576, 3)]


def _index(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k]  # [K], unique


def _expected(base: torch.Tensor, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = base.clone()
    for k, row in enumerate(index.tolist()):
        out[row] = src[k]
    return out


@pytest.mark.parametrize(("n", "d", "k"), SHAPES)
def test_opcheck(n, d, k):
    base = torch.randn(n, d, requires_grad=True)  # [N, D]
    src = torch.randn(k, d, requires_grad=True)  # [K, D]
    torch.library.opcheck(SCATTER, (base, src, _index(n, k)))


@pytest.mark.parametrize(("n", "d", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_and_reference_equal_row_assignment(n, d, k, dtype):
    base = torch.randn(n, d).to(dtype)  # [N, D]
    src = torch.randn(k, d).to(dtype)  # [K, D]
    index = _index(n, k)
    before = base.clone()
    want = _expected(base, src, index)
    assert torch.equal(token_scatter_reference(base, src, index), want)
    got = token_scatter(base, src, index)
    assert got.shape == (n, d) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(base, before), "token_scatter mutated base"
    assert got.data_ptr() != base.data_ptr()


def test_noncontiguous_inputs():
    base = torch.randn(6, 10)[:, ::2]  # [N, D] with column stride 2
    src = torch.randn(5, 3).t()  # [K, D], transposed
    index = torch.tensor([4, 9, 0, 9, 2, 9])[::2]  # [K], stride 2
    assert torch.equal(token_scatter(base, src, index), _expected(base, src, index))


def test_gradcheck():
    base = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)  # [N, D]
    src = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)  # [K, D]
    index = _index(9, 4)
    assert torch.autograd.gradcheck(token_scatter, (base, src, index))
    assert torch.autograd.gradgradcheck(token_scatter, (base, src, index))


def test_backward_zeros_base_rows_and_gathers_src():
    base = torch.randn(8, 3, requires_grad=True)  # [N, D]
    src = torch.randn(2, 3, requires_grad=True)  # [K, D]
    index = torch.tensor([5, 2])
    grad = torch.randn(8, 3)  # [N, D]
    token_scatter(base, src, index).backward(grad)
    want_base = grad.clone()
    want_base[index] = 0.0
    assert torch.equal(base.grad, want_base)
    assert torch.equal(src.grad, grad[index])


@pytest.mark.parametrize(
    ("base", "src", "index", "match"),
    [
        (torch.randn(2, 3, 4), torch.randn(1, 4), torch.tensor([0]), "base must be 2-D"),
        (torch.randn(4, 3), torch.randn(3), torch.tensor([0]), "src must be 2-D"),
        (torch.randn(4, 3), torch.randn(1, 3), torch.tensor([0], dtype=torch.int32), "int64"),
        (torch.randn(4, 3), torch.randn(2, 3), torch.tensor([0]), "src has 2 rows"),
        (torch.randn(4, 3), torch.randn(1, 5), torch.tensor([0]), "hidden size 5"),
        (torch.randn(4, 3), torch.randn(1, 3).half(), torch.tensor([0]), "dtype torch.float16"),
    ],
    ids=["base-3d", "src-1d", "index-int32", "rows", "hidden", "dtype"],
)
def test_invalid_inputs_raise_value_error(base, src, index, match):
    with pytest.raises(ValueError, match=match):
        token_scatter(base, src, index)


class _RoutedBlock(torch.nn.Module):
    """The routed-block pattern: gather the selected tokens, transform them, scatter back."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        index = torch.nonzero(mask).squeeze(-1)  # [K], K data-dependent
        selected = token_gather(x, index)  # [K, D]
        return token_scatter(x, self.proj(selected), index)  # [N, D]


def test_export_keeps_one_node_each_with_data_dependent_index():
    torch.manual_seed(0)
    block = _RoutedBlock(8).eval()
    x = torch.randn(10, 8)  # [N, D]
    mask = torch.rand(10) > 0.5  # [N]
    n = torch.export.Dim("n", min=2, max=8192)  # N = B*T varies with the sequence length
    ep = torch.export.export(block, (x, mask), dynamic_shapes={"x": {0: n}, "mask": {0: n}})
    for graph in (ep.graph, ep.run_decompositions().graph):
        targets = [node.target for node in graph.nodes]
        assert targets.count(GATHER) == 1 and targets.count(SCATTER) == 1
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    # Other token counts N and selection sizes K run through the same program.
    x33 = torch.randn(33, 8)  # [N, D]
    for x_run, m in [
        (x, mask),
        (x, ~mask),
        (x, torch.zeros(10, dtype=torch.bool)),
        (x, torch.ones(10, dtype=torch.bool)),
        (x33, torch.rand(33) > 0.3),
    ]:
        want = block(x_run, m)
        assert torch.equal(ep.module()(x_run, m), want)
        assert torch.equal(loaded.module()(x_run, m), want)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    try:
        return run_interpreted("scatter")
    except LookupError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_under_interpreter_equals_reference(interpreted, case):
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "d", "k"), [*SHAPES, (4096, 2048, 1000)])
def test_cuda_op_equals_reference(n, d, k, dtype):
    base = torch.randn(n, d, device="cuda").to(dtype)  # [N, D]
    src = torch.randn(k, d, device="cuda").to(dtype)  # [K, D]
    index = _index(n, k).cuda()
    want = token_scatter_reference(base, src, index)
    assert torch.equal(token_scatter(base, src, index), want)
