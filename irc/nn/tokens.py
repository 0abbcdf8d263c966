"""Running an outlined module on a subset of the tokens.

An outlined unit reads, besides its hidden state, tensors laid out along the
token axis (rotary cos/sin ``[1, T, hd]``, the attention mask ``[B, 1, T, T]``)
and symbolic sizes (B, T) used by its views. Each input gets an ``ArgRole``
decided once, at rewrite time, from the capture's symbolic shapes; at run time
the role says how to restrict the input to the selected tokens:

- ``tokens``: gather the selected positions along each token axis;
- ``query_mask``: the attention mask; gather its query axis (−2) only, the
  keys stay all T tokens (approximated tokens keep their keys and values);
- ``seq`` / ``batch``: a size: becomes the selection's length / batch;
- ``full``: passed unchanged.

Legend: B batch, T tokens, K selected tokens per row (Kmax: the longest row), D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

HIDDEN = "hidden"


@dataclass(frozen=True)
class ArgRole:
    source: int | str  # index into the unit's extra inputs, or HIDDEN, or a named tensor ("k", "v")
    kind: str  # "tokens" | "query_mask" | "seq" | "batch" | "full"
    axes: tuple[int, ...] = ()


def role_of(node: Node, source: int | str, batch_sym: str, seq_sym: str, mask: bool = False) -> ArgRole:
    """The role of an outlined module's input, from its captured value (``meta['val']``)."""
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        s = str(val)
        kind = "seq" if s == seq_sym else "batch" if s == batch_sym else "full"
        return ArgRole(source, kind)
    if isinstance(val, torch.Tensor):
        axes = tuple(i for i, d in enumerate(val.shape) if str(d) == seq_sym)
        if mask and axes:  # [B, 1, T, T]; decode graphs: [B, 1, T, P+T]
            return ArgRole(source, "query_mask", (val.dim() - 2,))
        if axes:
            return ArgRole(source, "tokens", axes)
    return ArgRole(source, "full")


def gather_rows(t: torch.Tensor, axis: int, pos: torch.Tensor) -> torch.Tensor:
    """``t`` restricted to positions ``pos [B, K]`` along ``axis`` (batch axis 0 may broadcast)."""
    B = pos.shape[0]
    moved = t.movedim(axis, 1)  # [B or 1, T, ...]
    if moved.shape[0] != B:
        moved = moved.expand(B, *moved.shape[1:])
    rows = torch.arange(B, device=pos.device).unsqueeze(1)  # [B, 1]
    return moved[rows, pos].movedim(1, axis)  # [B, K, ...] with K at axis


def restrict_keys(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mask ``[B, 1, Tq, Tk]`` with keys where ``keep [B, Tk]`` is False removed."""
    keep = keep[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def sink_mask(pad: torch.Tensor, n_sink: int) -> torch.Tensor:
    """The first ``n_sink`` real tokens of each row (padding on either side)."""
    if n_sink == 0:
        return torch.zeros_like(pad)
    rank = torch.cumsum(pad.to(torch.int32), dim=1)  # 1-based rank among real tokens
    return pad & (rank <= n_sink)


def row_layout(execute: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[B, Kmax]`` of each row's executed tokens in order, and which slots are real.

    Rows with fewer than Kmax executed tokens are padded with other positions of
    the same row; their ``valid`` is False and their results are discarded.
    """
    counts = execute.sum(dim=1)  # [B]
    kmax = int(counts.max()) if counts.numel() else 0
    # a stable sort of (not executed) puts each row's executed positions first, in order
    order = torch.sort((~execute).to(torch.int8), dim=1, stable=True).indices  # [B, T]
    pos = order[:, :kmax]  # [B, Kmax]
    valid = torch.arange(kmax, device=execute.device).unsqueeze(0) < counts.unsqueeze(1)
    return pos, valid


def top_k_positions(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the positions of the k highest scores; ties go to the earlier position.

    A stable sort rather than ``topk``: ``topk`` breaks ties in no specified order,
    and routers produce exact ties (a token whose hidden ReLU units are all zero
    gets the output bias as its margin). ONNX's TopK, what this lowers to, also
    puts the lower index first, so PyTorch and ONNX Runtime select the same tokens.
    """
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]


def subset_args(roles, hidden, extras, *, pos=None, flat=None, named=None, keep=None, valid=None,
                keys_selected: bool = False) -> list:
    """Arguments of an outlined module, restricted to a token subset by each input's role.

    ``pos [B, K]`` selects K positions per row (row layout); ``flat`` is the
    length of a flattened selection (batch 1, for MLPs). ``hidden`` is the
    already-gathered hidden state. The attention mask keeps all T keys unless
    ``keys_selected`` (Mixture-of-Depths: selected tokens attend to each other
    only, invalid slots masked by ``valid``); ``keep [B, T]`` removes keys
    (``kv_policy="drop"``).
    """
    args = []
    for role in roles:
        if role.source == HIDDEN:
            args.append(hidden)
            continue
        value = named[role.source] if isinstance(role.source, str) else extras[role.source]
        if role.kind == "seq":
            value = flat if flat is not None else pos.shape[1] if pos is not None else value
        elif role.kind == "batch" and flat is not None:
            value = 1
        elif role.kind == "query_mask":
            if pos is not None:
                value = gather_rows(value, role.axes[0], pos)
                if keys_selected:
                    value = restrict_keys(gather_rows(value, value.dim() - 1, pos), valid)
            if keep is not None:
                value = restrict_keys(value, keep)
        elif role.kind == "tokens" and pos is not None:
            for axis in role.axes:
                value = gather_rows(value, axis, pos)
        args.append(value)
    return args
