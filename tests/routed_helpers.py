"""Shared helpers for tests of routed models."""

from __future__ import annotations

import copy
import dataclasses

import torch

import irc
from irc.models import Architecture, LoadedModel
from irc.models.sources import ModelSource
from irc.plan import RoutingPlan

from tiny import tiny_model, tiny_tokenizer


def tiny_loaded(family: str, dtype=torch.float32, seed: int = 0) -> LoadedModel:
    model = tiny_model(family, seed).to(dtype)
    return LoadedModel(
        model=model, tokenizer=tiny_tokenizer(), arch=Architecture.from_config(model.config),
        source=ModelSource(f"tiny-{family}", "hf", None), directory=None, dtype=dtype,
        load_seconds=0.0, _weights_sha256="0" * 64,
    )


_ROUTED: dict = {}


def tiny_routed(family: str, plan: RoutingPlan | None = None, *, randomize: bool = True, seed: int = 0):
    """A tiny base model and a fresh routed copy of it (captures are cached: export costs ~1 s)."""
    plan = plan or RoutingPlan(lff_rank=16, n_sink=2)
    key = (family, plan, seed)
    if key not in _ROUTED:
        loaded = tiny_loaded(family, seed=seed)
        _ROUTED[key] = (loaded, irc.route(loaded, plan))
    loaded, cached = _ROUTED[key]
    routed = dataclasses.replace(cached, gm=copy.deepcopy(cached.gm))
    if randomize:
        randomize_routing(routed, seed)
    return loaded, routed


def randomize_routing(routed, seed: int = 0) -> None:
    """Give routers and forecasters non-trivial weights, so decisions and forecasts vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in routed.units.values():
            for p in unit.router.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if unit.forecaster is not None:
                for p in unit.forecaster.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def batch(T: int, B: int = 2, vocab: int = 300, seed: int = 0):
    """Token ids and a mask; row 1 is left-padded when T allows it."""
    g = torch.Generator().manual_seed(seed + T)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B > 1 and T > 2:
        mask[1, : min(3, T - 2)] = 0
    return ids, mask


def random_masks(routed, shape, fraction=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=g) < fraction for name in routed.units}


@torch.no_grad()
def eager_and_traceable(routed, ids, mask, mode: str, **setting) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the eager routed path and of the branch-free one ``torch.export`` captures."""
    routed.set_routing(mode, **setting)
    want = routed(ids, mask)
    for u in routed.units.values():
        u.traceable = True
    try:
        got = routed(ids, mask)
    finally:
        for u in routed.units.values():
            u.traceable = False
    return want, got
