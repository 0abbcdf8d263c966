"""The plugins' shape rules (plain Python) agree with the ops' fake (meta) implementations."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import irc.ops  # noqa: F401  (registers irc::token_gather / irc::token_scatter)
from irc.exporters.tensorrt.shapes import (
    AUTOTUNE_GATHER,
    AUTOTUNE_SCATTER,
    capacity_tokens,
    gather_output_shape,
    scatter_output_shape,
    threshold_tokens_bound,
)
from irc.ops.token_gather import token_gather_reference
from irc.ops.token_scatter import token_scatter_reference

D = 24
GRID = [(B, T, c) for B in (1, 2, 5) for T in (1, 7, 64, 1023) for c in (0.1, 0.25, 0.5, 0.75, 1.0)]


def _fake_shapes(N, K):
    with FakeTensorMode():
        x = torch.empty(N, D)
        index = torch.zeros(K, dtype=torch.long)
        src = torch.empty(K, D)
        return (tuple(torch.ops.irc.token_gather(x, index).shape),
                tuple(torch.ops.irc.token_scatter(x, src, index).shape))


@pytest.mark.parametrize("B,T,c", GRID)
def test_capacity_shapes_equal_the_fake_ones(B, T, c):
    N, K = B * T, capacity_tokens(B, T, c)
    assert K == B * min(T, math.ceil(c * T)) and 1 <= K <= N
    gather, scatter = _fake_shapes(N, K)
    assert gather_output_shape((N, D), (K,)) == gather == (K, D)
    assert scatter_output_shape((N, D), (K, D), (K,)) == scatter == (N, D)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 64)])
def test_threshold_shapes_with_a_data_dependent_count(B, T):
    """K from nonzero(mask) is an unbacked symbol in the fake op; the rule passes it through."""
    N = B * T
    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty(N, D)
        mask = torch.empty(N, dtype=torch.bool)
        index = torch.nonzero(mask).squeeze(-1)  # [K], K unbacked
        k_sym = index.shape[0]
        out = torch.ops.irc.token_gather(x, index)
        back = torch.ops.irc.token_scatter(x, out, index)
        assert isinstance(k_sym, torch.SymInt)
        assert gather_output_shape(x.shape, index.shape) == tuple(out.shape) == (k_sym, D)
        assert scatter_output_shape(x.shape, out.shape, index.shape) == tuple(back.shape) == (N, D)
    # the declared upper bound is reached when every token executes, and never passed
    for mask in (torch.ones(N, dtype=torch.bool), torch.rand(N) < 0.5, torch.zeros(N, dtype=torch.bool)):
        index = torch.nonzero(mask).squeeze(-1)
        assert index.shape[0] <= threshold_tokens_bound(B, T)
        got = token_gather_reference(torch.randn(N, D), index)
        assert tuple(got.shape) == gather_output_shape((N, D), tuple(index.shape))
    assert threshold_tokens_bound(B, T) == N


def test_shapes_on_real_outputs_including_an_empty_selection():
    for N, K in ((9, 0), (9, 4), (9, 9)):
        x, src, index = torch.randn(N, D), torch.randn(K, D), torch.randperm(N)[:K]
        assert tuple(token_gather_reference(x, index).shape) == gather_output_shape(x.shape, index.shape)
        assert tuple(token_scatter_reference(x, src, index).shape) == scatter_output_shape(
            x.shape, src.shape, index.shape)


def test_ranks_are_checked_and_symbolic_elements_pass_through():
    with pytest.raises(ValueError, match="x must be 2-D"):
        gather_output_shape((2, 3, 4), (1,))
    with pytest.raises(ValueError, match="index must be 1-D"):
        scatter_output_shape((2, 3), (1, 3), (1, 1))

    class Expr:  # stands in for tensorrt.plugin.ShapeExpr: opaque, indexable containers
        def __init__(self, name):
            self.name = name

    k, n, d = Expr("K"), Expr("N"), Expr("D")
    assert gather_output_shape((n, d), (k,)) == (k, d)
    assert scatter_output_shape((n, d), (k, d), (k,)) == (n, d)


def test_type_combinations_cover_fp32_fp16_bf16_with_an_int64_index():
    assert AUTOTUNE_GATHER == "FP32|FP16|BF16, INT64, FP32|FP16|BF16"
    assert AUTOTUNE_SCATTER == "FP32|FP16|BF16, FP32|FP16|BF16, INT64, FP32|FP16|BF16"
    with pytest.raises(ValueError, match="capacity"):
        capacity_tokens(1, 8, 0.0)
