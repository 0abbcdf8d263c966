"""Numeric tolerances used by the tests, each with where it comes from."""

# fp32 recomputation of the same math in a different order (batching, a loss
# computed by another implementation): a few ulps of values of order 1-10.
FP32_REORDER = 1e-5

# Perplexity from two implementations of the same mean NLL in fp32 / fp64
# accumulation: relative.
PPL_REL = 1e-5
