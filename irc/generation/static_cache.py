"""A static KV cache for the torch decode graph: preallocated buffers, new keys and values written in place.

The captured decode step is a functional cache (``irc.generation.capture``): each
attention layer returns ``present = cat(past, new)``, so every step allocates a
fresh ``[B, Hkv, P+T, hd]`` tensor per cache tensor and copies the whole past into
it: 2 · L · B · Hkv · (P+T) · hd elements written per step, the cache size.

With a static cache each full-length cache tensor is one buffer ``[B, Hkv, M, hd]``
(M: the prompt plus the new tokens, known when generation starts), allocated once.
The past handed to the graph is the view ``buffer[:, :, :P]`` (no copy); the graph's
``cat(past, new)`` nodes are ``kv_append(past, new, 2)`` (the pass
``irc.passes.static_kv_cache``), which writes the T new positions into
``buffer[:, :, P:P+T]`` and returns the view ``buffer[:, :, :P+T]``. Attention reads
that view, the valid prefix, under the same mask as before, so the logits are the
copying cache's logits. Per step and cache tensor, 2 · B · Hkv · T · hd bytes (fp16/
bf16; 4 · … in fp32) are written instead of the whole (P+T) positions.

``kv_append`` writes in place only into buffers this module allocated (``allocate``)
and only in eager execution; anywhere else (a plain tensor past, tracing for an
export, autograd) it is ``torch.cat``, the copying cache. So one graph serves both
caches: ``GenerationConfig.kv_cache`` picks ``static`` (default) or ``copy``.

The contract of a static cache is that of every static cache (HF ``StaticCache``,
gpt-fast): a step writes positions P..P+T of the buffer, so a present returned
earlier that covers those positions sees the new values. ``generate`` feeds each
present to the next step only; a caller that branches from one past twice must use
``copy``.

What stays a copy: a forecast-folded attention layer's sink-slot cache
(``irc.passes.compact_sink_caches``: at most n_sink positions, rebuilt per step; it
gets no buffer), and a step whose present some unit rebuilt itself (a folded unit's
sink step over a full-length cache): ``adopt`` copies it into the buffer once.
(Grouped-query attention reads the buffer's own Hkv heads: ``irc.passes.grouped_kv_attention``.)

Each view this module hands out (``allocate``, ``kv_append``, ``adopt``) carries its
buffer as an attribute, which keeps the buffer alive as long as a view of it is and
tells ``kv_append`` where to write. A registry of buffers by storage, held weakly,
was not enough: under ``torch.inference_mode`` a view does not reference its base
tensor, so the buffer's Python object died at once and every step silently fell back
to ``cat`` (tests/generation/test_static_cache.py runs the cache in both modes).

Legend: B batch, Hkv key/value heads, hd head dim, P past positions, T new ones, M capacity, L layers.
"""

from __future__ import annotations

import torch

AXIS = 2  # the position axis of [B, Hkv, M, hd]
_BUFFER = "_irc_static_buffer"  # the attribute of a view naming its buffer


def _view(buffer: torch.Tensor, length: int) -> torch.Tensor:
    """``buffer[:, :, :length]``, carrying its buffer."""
    view = buffer.narrow(AXIS, 0, length)
    setattr(view, _BUFFER, buffer)
    return view


def allocate(batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
             device="cpu") -> torch.Tensor:
    """An empty past (``[B, Hkv, 0, hd]``) viewing a new ``[B, Hkv, capacity, hd]`` buffer."""
    buffer = torch.zeros(batch, kv_heads, max(capacity, 1), head_dim, dtype=dtype, device=device)
    return _view(buffer, 0)


def buffer_of(past: torch.Tensor) -> torch.Tensor | None:
    """The static buffer ``past`` is a prefix view of (``buffer[:, :, :P]``), or None.

    Called twice per layer and step: the common answers (no buffer, tracing) come first and cheap.
    """
    buffer = getattr(past, _BUFFER, None)
    if buffer is None or torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return None
    if not (_is_prefix_view(past, buffer) and past.shape[AXIS + 1:] == buffer.shape[AXIS + 1:]):
        return None
    return buffer


def kv_append(past: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.cat([past, new], dim)``, written in place when ``past`` is a prefix of a static buffer."""
    buffer = buffer_of(past)
    if (buffer is None or dim % past.dim() != AXIS or new.dtype != past.dtype or new.device != past.device
            or (torch.is_grad_enabled() and new.requires_grad)):
        return torch.cat([past, new], dim=dim)
    P, T = past.shape[AXIS], new.shape[AXIS]
    if P + T > buffer.shape[AXIS] or new.shape[:AXIS] != past.shape[:AXIS]:
        return torch.cat([past, new], dim=dim)  # full: the decoder's adopt grows the buffer
    buffer.narrow(AXIS, P, T).copy_(new)
    return _view(buffer, P + T)


def adopt(past: list[torch.Tensor], present: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every present whose past was a static view, as a view of that buffer again.

    A present the graph wrote in place is returned as it is (no copy). One some unit
    rebuilt (a fresh tensor) is copied into the buffer, grown to twice the length
    when it no longer fits: the next step writes in place again.
    """
    out = []
    for p, q in zip(past, present, strict=True):
        buffer = buffer_of(p)
        if buffer is None:
            out.append(q)
            continue
        if _is_prefix_view(q, buffer):  # written in place
            setattr(q, _BUFFER, buffer)
            out.append(q)
            continue
        length = q.shape[AXIS]
        if length > buffer.shape[AXIS]:
            view = allocate(buffer.shape[0], buffer.shape[1], max(2 * buffer.shape[AXIS], length),
                            buffer.shape[3], buffer.dtype, buffer.device)
            buffer = buffer_of(view)
        buffer.narrow(AXIS, 0, length).copy_(q)
        out.append(_view(buffer, length))
    return out


def _is_prefix_view(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    return (t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            and t.stride() == buffer.stride() and t.storage_offset() == buffer.storage_offset()
            and t.shape[:AXIS] == buffer.shape[:AXIS])
