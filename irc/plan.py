"""The routing plan: which units are routed, and how.

A frozen dataclass validated on construction, round-tripping through JSON; it
is what ``irc.json`` records and what ``route_decoder_blocks`` applies.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

VARIANTS = ("informed", "skip", "mod", "static")
LFF_ACTIVATIONS = ("identity", "silu")
KINDS = ("attn", "mlp")
KV_POLICIES = ("keep", "drop")
MODES = ("train", "threshold", "capacity", "mask", "dense")
FOLDS = ("forecast", "plain")  # how a folded unit runs (irc.passes.fold_static_routes)


@dataclass(frozen=True)
class RoutingPlan:
    """What to route.

    - ``variant``: ``informed`` (approximated tokens take the forecaster's output),
      ``skip`` (they take the identity, as SkipGPT), ``mod`` (Mixture-of-Depths:
      whole layers, top-k tokens per sequence, output scaled by the router weight),
      ``static`` (ShortGPT: the layers in ``layers`` are dropped for every token).
    - ``kinds`` / ``layers``: the units routed (``layers=None``: all).
    - ``router_hidden``: router width; ``None`` is ``max(D//4 − 200, D//8)``.
    - ``lff_rank``: the forecaster's rank r.
    - ``lff_activation``: ``identity`` (a reduced-rank linear map, what the closed-form
      fit produces) or ``silu`` (the paper's ``W2·SiLU(W1·a + b1) + b2``).
    - ``n_sink``: the first n real tokens of each sequence always execute.
    - ``kv_policy``: ``keep`` (approximated tokens still serve as keys) or ``drop``.
    - ``capacity``: the execute fraction c of ``capacity`` mode (k = ceil(c·T)).
    - ``lora_rank`` / ``lora_alpha`` / ``lora_targets``: LoRA on the units' projections
      (rank 0: none).
    - ``folded``: units whose route was folded to a constant (``fold_static_routes``), as
      ``(unit name, how)`` pairs: ``forecast`` (every non-sink token takes the forecaster)
      or ``plain`` (every token executes, no router). JSON: a ``{name: how}`` object.
    """

    variant: str = "informed"
    kinds: tuple[str, ...] = KINDS
    layers: tuple[int, ...] | None = None
    router_hidden: int | None = None
    lff_rank: int = 100
    lff_activation: str = "identity"
    n_sink: int = 4
    kv_policy: str = "keep"
    capacity: float = 0.75
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj", "gate_proj")
    folded: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "folded", _folds(self.folded))
        if self.folded and self.variant not in ("informed", "skip"):
            raise ValueError(f"folded units need per-unit routing (informed or skip), got variant {self.variant!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {', '.join(KV_POLICIES)}, got {self.kv_policy!r}")
        if self.router_hidden is not None and self.router_hidden < 1:
            raise ValueError(f"router_hidden must be positive, got {self.router_hidden}")
        if self.lff_activation not in LFF_ACTIVATIONS:
            raise ValueError(f"lff_activation must be one of {', '.join(LFF_ACTIVATIONS)}, "
                             f"got {self.lff_activation!r}")
        if self.variant == "static" and not self.layers:
            raise ValueError("the static variant needs the layers to drop (layers=...)")
        if self.lff_rank < 1:
            raise ValueError(f"lff_rank must be positive, got {self.lff_rank}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.kv_policy == "drop" and self.n_sink < 1:
            raise ValueError("kv_policy='drop' needs n_sink >= 1 (a query must keep at least one key)")
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"capacity must be in (0, 1], got {self.capacity}")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be non-negative indices, got {self.layers}")
        for name, _ in self.folded:
            layer, kind = _unit_order((name, ""))
            if not self.selects(layer, kind):
                raise ValueError(f"folded unit {name} is not one this plan routes (kinds {self.kinds}, "
                                 f"layers {'all' if self.layers is None else self.layers})")

    def router_width(self, hidden: int) -> int:
        return self.router_hidden or max(hidden // 4 - 200, hidden // 8)

    def selects(self, layer: int, kind: str) -> bool:
        in_layers = self.layers is None or layer in self.layers
        return in_layers and (self.variant in ("mod", "static") or kind in self.kinds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        d["lora_targets"] = list(self.lora_targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["folded"] = dict(self.folded)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RoutingPlan:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown routing plan fields: {', '.join(sorted(unknown))}")
        return cls(**d)


def _folds(folded) -> tuple[tuple[str, str], ...]:
    """``folded`` as sorted ``(name, how)`` pairs, from pairs or a ``{name: how}`` mapping."""
    pairs = list(folded.items()) if isinstance(folded, dict) else [tuple(p) for p in folded]
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"folded must hold (unit name, how) pairs, got {pair!r}")
        name, how = pair
        if re.fullmatch(r"layer\d+_(attn|mlp)", name) is None:
            raise ValueError(f"folded unit names look like layer3_attn or layer3_mlp, got {name!r}")
        if how not in FOLDS:
            raise ValueError(f"a unit folds to one of {', '.join(FOLDS)}, got {how!r} for {name}")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"folded names a unit twice: {sorted(n for n in names if names.count(n) > 1)[0]}")
    return tuple(sorted(pairs, key=_unit_order))


def _unit_order(pair: tuple[str, str]) -> tuple[int, str]:
    layer, _, kind = pair[0][len("layer"):].partition("_")
    return int(layer), kind
