"""Routed models: build one from a base model, run it, save it, load it.

    base = irc.load_model("smollm2-135m")
    routed = irc.route(base, RoutingPlan(variant="informed"))
    routed.set_routing("capacity", capacity=0.75)
    logits = routed(input_ids)                        # [B, T, V]
    routed.save("runs/smollm2-s25")
    again = irc.load("runs/smollm2-s25")              # re-captures, re-applies, checks the base
    routed.fold({"layer3_attn": "forecast"})          # constant routes compiled away (plan.folded)

The directory format (DESIGN.md §4): ``irc.json`` (format version, base source and
the sha256 of its weights, architecture, routing plan, per-unit facts, training
and evaluation records) and ``routing.safetensors`` (router, forecaster and
threshold tensors, and nothing of the base model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule

from irc import __version__
from irc.cache import atomic_dir, respect_umask
from irc.capture import capture
from irc.errors import UserError
from irc.inspect.summary import op_counts as op_counts_of
from irc.models import LoadedModel, load_model
from irc.passes.drop_noop_conversions import drop_noop_conversions
from irc.passes.fold_static_routes import fold_static_routes
from irc.passes.pipeline import run_passes
from irc.passes.result import PassResult
from irc.passes.route_decoder_blocks import (
    folded_modules,
    route_decoder_blocks,
    routed_modules,
    set_routing,
)
from irc.plan import RoutingPlan

FORMAT = "irc-routed-model"
FORMAT_VERSION = 1


@dataclass
class RoutedModel:
    gm: GraphModule
    plan: RoutingPlan
    base: LoadedModel
    passes: list[dict] = field(default_factory=list)
    capture_nodes: int = 0
    capture_op_counts: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)  # training / evaluation records saved in irc.json

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.gm(input_ids, attention_mask)

    @property
    def units(self) -> dict[str, torch.nn.Module]:
        """The dynamic units: those with a router (folded units are in ``folded``)."""
        return routed_modules(self.gm)

    @property
    def folded(self) -> dict[str, torch.nn.Module]:
        """The folded units (``FoldedUnit``), by name."""
        return folded_modules(self.gm)

    def fold(self, folds: dict[str, str]) -> PassResult:
        """Fold the named units (``{name: "forecast" | "plain"}``, see ``choose_folds``) and record
        it in the plan, so that ``save`` → ``load`` re-applies the fold."""
        plan = dataclasses.replace(self.plan, folded={**dict(self.plan.folded), **folds})  # validates
        result = fold_static_routes(self.gm, folds)
        self.plan = plan
        self.passes.append({"pass": "fold_static_routes", "modified": result.modified,
                            **{k: v for k, v in result.stats.items() if k != "folded"}})
        return result

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def arch(self):
        return self.base.arch

    def set_routing(self, mode: str, **kwargs) -> None:
        set_routing(self.gm, mode, **kwargs)

    def reset_stats(self) -> None:
        for u in (*self.units.values(), *self.folded.values()):
            u.reset_stats()

    def execute_fractions(self) -> dict[str, float | None]:
        return {name: u.execute_fraction for name, u in self.units.items()}

    def routing_state(self) -> dict[str, torch.Tensor]:
        """Router, forecaster and threshold tensors of every unit (what ``routing.safetensors`` holds)."""
        state = {}
        for name, unit in self.units.items():
            for part in ("router", "forecaster", "lora"):
                module = getattr(unit, part, None)
                if module is not None:
                    for k, v in module.state_dict().items():
                        state[f"{name}.{part}.{k}"] = v
            state[f"{name}.threshold"] = unit.threshold
        for name, unit in self.folded.items():  # no router, no threshold
            for part in ("forecaster", "lora"):
                module = getattr(unit, part, None)
                if module is not None:
                    for k, v in module.state_dict().items():
                        state[f"{name}.{part}.{k}"] = v
        return state

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.routing_state())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise UserError(f"routing weights do not fit the routing plan: missing "
                            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        for name, unit in (*self.units.items(), *self.folded.items()):
            for part in ("router", "forecaster", "lora"):
                module = getattr(unit, part, None)
                if module is not None:
                    prefix = f"{name}.{part}."
                    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            if name in self.units:
                unit.threshold.copy_(state[f"{name}.threshold"])

    def describe_units(self) -> list[dict]:
        """One row per routed or folded unit, in graph order (folded ones with ``"folded": how``)."""
        rows = []
        units, folded = self.units, self.folded
        for name, unit in self.gm.named_children():
            if name not in units and name not in folded:
                continue
            row = {
                "name": name,
                "layer": unit.layer,
                "kind": unit.kind,
                "variant": self.plan.variant,
                "router_width": unit.router.fc1.out_features if unit.router is not None else None,
                "lff_rank": unit.forecaster.w1.out_features if unit.forecaster is not None else None,
                "threshold": float(unit.threshold) if name in units else None,
                "execute_fraction": unit.execute_fraction,
            }
            if name in folded:
                row["folded"] = unit.how
            rows.append(row)
        return rows

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``irc.json`` and ``routing.safetensors`` into ``out``, atomically."""
        from safetensors.torch import save_file

        out = Path(out)
        if out.exists() and not overwrite:
            raise UserError(f"{out} already exists; choose another directory or overwrite it")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "irc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": {
                "source": self.base.source.given,
                "path": str(self.base.source.path),
                "kind": self.base.source.kind,
                "weights_sha256": self.base.weights_sha256,
                "dtype": str(self.base.dtype).replace("torch.", ""),
            },
            "architecture": self.arch.to_dict(),
            "plan": self.plan.to_dict(),
            "units": self.describe_units(),
            **self.records,
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.routing_state().items()}
        with atomic_dir(out.parent / f".{out.name}.new") as tmp:
            save_file(state, tmp / "routing.safetensors", metadata={"format": FORMAT})
            respect_umask(tmp / "routing.safetensors")
            (tmp / "irc.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(out.parent / f".{out.name}.new", out)
        return out


def _swap_into_place(new: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old"
    if out.exists():
        os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def route(base: LoadedModel, plan: RoutingPlan | None = None, *, dump_dir: str | Path | None = None) -> RoutedModel:
    """Capture ``base`` and apply the routing pipeline."""
    plan = plan or RoutingPlan()
    captured = capture(base.model)
    gm = captured.gm
    op_counts = op_counts_of(gm)
    passes = [
        # fp32 graphs route residual uses through no-op `to` nodes; restore the source's data flow
        ("drop_noop_conversions", drop_noop_conversions),
        # the rewrite: each selected unit becomes a RoutedUnit (or a RoutedLayer for `mod`)
        ("route_decoder_blocks", lambda g: route_decoder_blocks(g, plan)),
    ]
    if plan.folded:
        # the units whose route was found constant: plain or forecast-only, no router
        passes.append(("fold_static_routes", lambda g: fold_static_routes(g, dict(plan.folded))))
    report = run_passes(gm, passes, dump_dir)
    routed = RoutedModel(gm=gm, plan=plan, base=base, passes=report, capture_nodes=captured.nodes,
                         capture_op_counts=op_counts)
    if not plan.folded:  # folded units forecast by design: no dense mode to compare
        from irc.probe import check_dense_equivalence

        check_dense_equivalence(routed)  # support is decided by the graph (issue 13)
    return routed


def is_routed_dir(path: str | Path) -> bool:
    return (Path(path) / "irc.json").is_file()


def load(directory: str | Path, *, dtype: str | torch.dtype | None = None, base: str | None = None) -> RoutedModel:
    """Load a routed model directory: re-capture the base, re-apply the pass, load the routing weights.

    ``base`` overrides where the base model is looked for (its weights must still
    hash to what the directory records).
    """
    directory = Path(directory)
    manifest, state = _read_routed_dir(directory)  # every file checked before the base loads
    info = manifest["base"]
    source = base or _recorded_source(directory, info)
    loaded = load_model(source, dtype=dtype or info.get("dtype", "bf16"))
    if loaded.weights_sha256 != info["weights_sha256"]:
        raise UserError(
            f"the base model at {source} is not the one {directory} was built on: its weights hash to "
            f"{loaded.weights_sha256[:16]}…, the routed model records {info['weights_sha256'][:16]}…"
        )
    plan = RoutingPlan.from_dict(manifest["plan"])
    routed = route(loaded, plan)
    # load_state_dict copies into the existing tensors, casting to their dtype
    routed.load_routing_state(state)
    routed.records = {k: v for k, v in manifest.items() if k in ("training", "evaluation", "calibration", "fold")}
    return routed


def _read_routed_dir(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``irc.json`` and ``routing.safetensors``, each failure a ``UserError`` naming the file."""
    from safetensors.torch import load_file

    manifest_path = directory / "irc.json"
    if not manifest_path.is_file():
        raise UserError(f"{directory} is not a routed model directory (no irc.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{manifest_path} is not readable JSON ({e}); convert the model again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_path} is not a routed model manifest (a JSON object); convert the model again")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{manifest_path}: unsupported format {manifest.get('format')!r} version "
                        f"{manifest.get('format_version')!r}; this irc reads {FORMAT} {FORMAT_VERSION}")
    info = manifest.get("base")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str)
                                             for k in ("source", "path", "weights_sha256")):
        raise UserError(f"{manifest_path} does not record its base model (base.source, base.path, "
                        "base.weights_sha256); convert the model again")
    if not isinstance(manifest.get("plan"), dict):
        raise UserError(f"{manifest_path} does not record its routing plan; convert the model again")
    weights = directory / "routing.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights} is missing; convert the model again")
    try:
        state = load_file(weights)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
        raise UserError(f"{weights} is {'empty' if weights.stat().st_size == 0 else 'truncated or corrupt'} "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                        "convert the model again") from None
    return manifest, state


def _recorded_source(directory: Path, info: dict) -> str:
    """The base model a routed directory records: an alias, or its path; a relative path is taken
    relative to the routed directory, never to the working directory."""
    from irc.models.sources import ALIASES

    if info["source"] in ALIASES:
        return info["source"]
    path = Path(info["path"]).expanduser()
    return str(path if path.is_absolute() else directory / path)
