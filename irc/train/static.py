"""The ShortGPT baseline: drop the layers with the lowest block influence.

Block influence of layer l is ``1 − cos(x_in, x_out)`` averaged over real
tokens: a layer that barely turns the residual stream matters least. The number
of layers dropped matches the FLOP saving of the target sparsity:
``round(s · L)`` layers (a layer's FLOPs are nearly uniform across layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irc.data.windows import batches


@torch.no_grad()
def block_influence(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1) -> list[float]:
    """Per decoder layer, mean ``1 − cos(x_in, x_out)`` over the tokens of ``windows``."""
    layers = model.model.layers
    sums = [0.0] * len(layers)
    count = 0

    def hook(module, args, kwargs, output, i):
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, tuple) else output
        sums[i] += float((1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)).sum())

    handles = [layer.register_forward_hook(lambda m, a, k, o, i=i: hook(m, a, k, o, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        for batch in batches(windows, batch_size):
            model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / count for s in sums]


def layers_to_drop(influence: list[float], sparsity: float) -> tuple[int, ...]:
    n = round(sparsity * len(influence))
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    return tuple(sorted(order[:n]))
