"""``irc convert``: capture, rewrite, train, calibrate, fold, evaluate and save, resumably.

The job is a list of stages (``STAGES``) that ``convert`` walks in order. Each
stage is one function of the shared ``Job``; the ones that apply to the run's
variant run, each followed by a checkpoint in a work directory beside OUT:

1. ``plan``       — the routing plan and the rewritten graph (``static``: block influence);
2. ``lff``        — forecaster fit (informed, static-lff; closed form by default);
3. ``init``       — router init from forecast error (informed, optional);
4. ``routers``    — router training (informed, skip, mod), checkpointed every few steps;
5. ``lora``       — LoRA on q/v/gate projections, routers frozen (optional, ``lora_steps``);
6. ``select``     — static-lff: the units replaced by their forecasters, greedily;
7. ``calibrate``  — thresholds for the budget (informed, skip);
8. ``fold``       — units that (almost) always take one path lose their routers
                    (``fold_epsilon``; always for static-lff);
9. ``evaluate``   — dense and routed perplexity, achieved sparsity, FLOPs;
then an atomic save of OUT.

The budget is the paper's unit sparsity (``sparsity``) or a share of the FLOPs
per token saved (``flops_saved``, routers and forecasters counted): router
training weights each unit's execute gate by what executing it costs, and
calibration meets the same weighted target.

A checkpoint is the routing tensors (safetensors) and the stage's record and
time (JSON); nothing executable is ever read back. ``resume=True`` continues
from the last checkpoint of a run with the same configuration and reaches the
same result as an uninterrupted run: stages re-apply their graph changes
(folding) before their tensors load, router training saves its optimizer and
RNG state, and the data each stage sees is taken in a fixed order whether it
runs or resumes. OUT is written only at the end, atomically: a failed or
interrupted run leaves no OUT, only the work directory that ``--resume`` picks up.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from irc.cache import atomic_file, write_json_atomic
from irc.data import load_corpus, token_stream
from irc.errors import UserError
from irc.plan import RoutingPlan
from irc.train.distributed import broadcast_object, on_main, world

PRESETS: dict[str, dict] = {
    # the demo: a few minutes on a 2-core CPU
    "quick": dict(lff_windows=8, init_windows=4, router_steps=60, batch_size=2, train_seq_len=512,
                  calib_windows=8),
    # the benchmark setting (≤ 45 min on a 2-core CPU): router training, then LoRA under the
    # calibrated decisions inference makes, which lowered perplexity at equal FLOPs far more than
    # the paper's LoRA under Gumbel gates (docs/results/lora_sweep.md, frontier.md)
    "standard": dict(lff_windows=24, init_windows=8, router_steps=250, batch_size=4, train_seq_len=512,
                     calib_windows=8, lora_steps=50, lora_lr=1e-3, lora_routing="threshold"),
}
VARIANTS = ("informed", "skip", "mod", "static", "static-lff")
# New converts budget compute, not unit counts, and fold what the routers learned to be static:
# on SmolLM2 the FLOP budget lands on its target (unit sparsity lands wherever the learned
# allocation puts it), and folding at 0.05 lowered perplexity at equal FLOPs (docs/results/frontier.md).
DEFAULT_FLOPS_SAVED = 0.20
DEFAULT_FOLD_EPSILON = 0.05


@dataclass(frozen=True)
class ConvertConfig:
    sparsity: float | None = None  # the paper's budget: the share of (token, unit) pairs approximated
    flops_saved: float | None = None  # or a compute budget: the share of FLOPs per token saved
    variant: str = "informed"
    preset: str = "quick"
    data: str = "wiki:train"
    eval_data: str = "wiki:heldout"
    seed: int = 0
    dtype: str = "bf16"
    lff_rank: int = 100
    lff_activation: str = "identity"
    lff_method: str = "closed-form"
    kv_policy: str = "keep"
    n_sink: int = 4
    router_init: bool = True
    lr: float = 2e-3
    lff_seq_len: int = 1024
    lff_windows: int = 8
    init_windows: int = 4
    router_steps: int = 60
    batch_size: int = 2
    train_seq_len: int = 512
    calib_windows: int = 4
    checkpoint_every: int = 20
    lora_steps: int = 0  # stage 5: LoRA (rank 16, α 32, q/v/gate projections); 0 skips it
    lora_rank: int = 16
    lora_lr: float = 3e-4
    # LoRA's routing while it trains (irc.train.lora_train): "train" (hard Gumbel gates, the paper's)
    # or "threshold" (the calibrated decisions inference makes; mod always trains with "train")
    lora_routing: str = "train"
    lora_distill: float = 0.0  # weight of KL to the dense base model in the LoRA loss
    fold_epsilon: float | None = DEFAULT_FOLD_EPSILON  # fold units executing ≤ ε or ≥ 1 − ε of held-in tokens; None: no folding
    fold_min_saving: float = 0.0  # also fold plain the routes saving < this share of the FLOPs per token (choose_folds)
    refine_steps: int = 0  # after folding: LoRA steps on the folded model, then recalibration (refine_folded)
    static_score_windows: int = 2  # static-lff: held-in windows each unit's loss increase is measured on
    eval_seq_len: int = 1024
    eval_tokens: int = 20480
    evaluate_dense: bool = True

    def __post_init__(self):
        if self.sparsity is None and self.flops_saved is None:
            object.__setattr__(self, "flops_saved", DEFAULT_FLOPS_SAVED)
        if self.sparsity is not None and self.flops_saved is not None:
            raise UserError("give one budget: --sparsity S (unit sparsity) or --flops-saved F, not both")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.flops_saved is not None and not 0.0 <= self.flops_saved < 1.0:
            raise UserError(f"--flops-saved must be in [0, 1), got {self.flops_saved}")
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        if self.variant not in VARIANTS:
            raise UserError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.variant == "static-lff" and self.flops_saved is None:
            raise UserError("--variant static-lff chooses units by FLOPs: give --flops-saved F")
        if self.lora_routing not in ("train", "threshold"):
            raise UserError(f"--lora-routing must be train or threshold, got {self.lora_routing!r}")
        if not 0.0 <= self.lora_distill <= 1.0:
            raise UserError(f"--lora-distill must be in [0, 1], got {self.lora_distill}")
        if self.fold_epsilon is not None and not 0.0 <= self.fold_epsilon < 0.5:
            raise UserError(f"--fold-epsilon must be in [0, 0.5), got {self.fold_epsilon}")
        if not 0.0 <= self.fold_min_saving < 1.0:
            raise UserError(f"--fold-min-saving must be in [0, 1), got {self.fold_min_saving}")
        if self.refine_steps < 0:
            raise UserError(f"--refine-steps must be >= 0, got {self.refine_steps}")
        if self.refine_steps > 0 and (self.variant != "informed" or self.fold_epsilon is None or self.lora_steps <= 0):
            raise UserError("--refine-steps trains the LoRA deltas of the folded model: it needs the informed "
                            "variant, folding (no --no-fold) and LoRA (--lora-steps N > 0, as the standard preset has)")

    @classmethod
    def from_preset(cls, sparsity: float | None = None, preset: str = "quick", **overrides) -> ConvertConfig:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        return cls(sparsity=sparsity, preset=preset, **{**PRESETS[preset], **overrides})

    @property
    def budget_label(self) -> str:
        return (f"flops_saved={self.flops_saved:.2f}" if self.flops_saved is not None
                else f"sparsity={self.sparsity:.2f}")

    def plan(self) -> RoutingPlan:
        variant = {"static": "informed", "static-lff": "informed"}.get(self.variant, self.variant)
        nominal = self.sparsity if self.sparsity is not None else self.flops_saved
        return RoutingPlan(variant=variant, lff_rank=self.lff_rank, lff_activation=self.lff_activation,
                           n_sink=self.n_sink, kv_policy=self.kv_policy,
                           capacity=max(1.0 - nominal, 1e-3),
                           lora_rank=self.lora_rank if self.lora_steps > 0 and self.variant not in ("static", "static-lff") else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ConvertConfig:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


class _Work:
    """The work directory: stage checkpoints and the configuration they belong to.


    On many processes rank 0 alone reads and writes it (``on_main``): every method is then
    a collective that all ranks call in the same order, and what rank 0 read reaches the
    others by broadcast; checkpoints hold no trace of the number of processes, so a run
    resumes with any number."""

    def __init__(self, out: Path, config: ConvertConfig, source: str, resume: bool):
        self.dir = out.parent / f".{out.name}.irc-work"
        key = {"config": {k: v for k, v in config.to_dict().items() if k not in LATE_SETTINGS}, "source": source}
        meta = self.dir / "run.json"

        def setup():
            if self.dir.exists() and not resume:
                shutil.rmtree(self.dir)
            if resume and meta.is_file():
                recorded = self._read_json("run.json")
                if isinstance(recorded, dict) and isinstance(recorded.get("config"), dict):
                    recorded["config"] = {k: v for k, v in recorded["config"].items() if k not in LATE_SETTINGS}
                if recorded != key:
                    raise UserError(f"--resume: the checkpoints in {self.dir} belong to another configuration "
                                    "or model; run without --resume to start over")
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(meta, key)

        on_main(setup)

    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, name: str) -> bool:
        return on_main(lambda: self.path(name).is_file())

    def read_json(self, name: str):
        return on_main(lambda: self._read_json(name))

    def _read_json(self, name: str):
        try:
            return json.loads(self.path(name).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"checkpoint {self.path(name)} is corrupt ({e}); run without --resume") from None

    def save_routing(self, name: str, routed) -> None:
        from safetensors.torch import save

        def write():
            state = {k: v.detach().contiguous().cpu() for k, v in routed.routing_state().items()}
            with atomic_file(self.path(name), "wb") as f:
                f.write(save(state))

        on_main(write)

    def load_routing(self, name: str, routed) -> None:
        from safetensors.torch import load_file

        def read():
            try:
                return load_file(self.path(name))
            except Exception as e:  # noqa: BLE001 - a file safetensors cannot parse is unusable
                raise UserError(f"checkpoint {self.path(name)} is corrupt ({type(e).__name__}: {e}); "
                                "run without --resume") from None

        routed.load_routing_state(on_main(read))

    def write_json(self, name: str, obj) -> None:
        on_main(lambda: write_json_atomic(self.path(name), obj))

    def remove(self) -> None:
        on_main(lambda: shutil.rmtree(self.dir, ignore_errors=True))

    def discard_from(self, stages: list[str]) -> None:
        """Forget the checkpoints of ``stages`` (and router training's progress): they run again."""
        def drop():
            for name in stages:
                for suffix in (".json", ".safetensors"):
                    self.path(f"stage-{name}{suffix}").unlink(missing_ok=True)
            if "routers" in stages:
                self.path("routers-progress.safetensors").unlink(missing_ok=True)

        on_main(drop)


@dataclass
class Job:
    """What the stages share: the configuration, the models, the data, the records."""

    config: ConvertConfig
    source: str
    base: object  # irc.models.LoadedModel
    stream: np.ndarray  # training tokens, calibration windows excluded
    calib: torch.Tensor  # held-in windows [N, T]: calibration, static-lff scoring, fold evidence
    work: _Work
    log: Callable[[str], None]
    show_progress: bool
    on_stage: Callable[[str, dict], None]
    plan: RoutingPlan | None = None
    routed: object | None = None  # irc.routing.RoutedModel, from the plan stage on
    records: dict = field(default_factory=dict)
    windows: dict = field(default_factory=dict)  # stage name → its training windows
    cursor: int = 0

    def take(self, count: int, seq_len: int) -> torch.Tensor:
        """The next ``count`` windows of the training stream (a fixed order, run or resumed)."""
        from irc.data.windows import make_windows

        w = make_windows(self.stream, seq_len, count, start=self.cursor)
        self.cursor += count * seq_len
        return w

    def budget(self, seq_len: int):
        """The run's budget over the routed model's dynamic units (folded ones fixed)."""
        from irc.eval.routed import routed_budget

        c = self.config
        return routed_budget(self.routed, sparsity=c.sparsity, flops_saved=c.flops_saved, seq_len=seq_len)

    def nominal_sparsity(self) -> float:
        """The unit sparsity that stands for the budget where a stage needs one number (router
        init labels, Mixture-of-Depths capacity, ShortGPT layer count)."""
        c = self.config
        if c.sparsity is not None:
            return c.sparsity
        from irc.eval.flops import sparsity_for_flops

        if self.routed is not None and self.plan.variant in ("informed", "skip"):
            return 1.0 - self.budget(c.eval_seq_len).target
        return sparsity_for_flops(self.base.arch, self.plan, c.eval_seq_len, c.flops_saved)


@dataclass(frozen=True)
class Stage:
    """One step of the job: ``run`` computes (returns its record), ``restore`` re-applies what a
    checkpointed run changed beyond the routing tensors (e.g. the graph), ``data`` takes its
    windows (always, so later stages see the same data whether this one runs or resumes)."""

    name: str
    applies: Callable[[ConvertConfig], bool]
    run: Callable[[Job], dict | None]
    record_at: tuple[str, ...] = ()  # where its record goes in the records
    data: Callable[[Job], None] | None = None
    restore: Callable[[Job, dict | None], None] | None = None
    checkpoint: bool = True
    # the settings of this stage that ``--resume`` lets change (``LATE_SETTINGS``): a checkpoint
    # whose recorded settings differ is re-run, and every stage after it
    settings: Callable[[ConvertConfig], dict] = lambda c: {}


# --- the stages -------------------------------------------------------------


def _plan(job: Job) -> dict:
    from irc.routing import route
    from irc.train.static import block_influence, layers_to_drop

    c, record = job.config, {}
    plan = c.plan()
    if c.variant == "static":
        influence = block_influence(job.base.model, job.calib)
        plan = replace(plan, variant="static", layers=layers_to_drop(influence, _static_sparsity(job, plan)))
        record["block_influence"] = [round(x, 5) for x in influence]
        job.log(f"static: dropping layers {list(plan.layers)} (lowest block influence)")
    record["plan"] = plan.to_dict()
    job.plan = plan
    job.routed = route(job.base, plan)
    return record


def _static_sparsity(job: Job, plan: RoutingPlan) -> float:
    """Layers to drop for ShortGPT: the budget's unit sparsity, or the fewest layers saving ≥ F of FLOPs."""
    c, arch = job.config, job.base.arch
    if c.sparsity is not None:
        return c.sparsity
    layer = arch.attention_flops(c.eval_seq_len) + arch.mlp_flops()
    total = arch.dense_flops_per_token(c.eval_seq_len)
    for k in range(arch.n_layers + 1):
        if k * layer / total >= c.flops_saved - 1e-9:
            return k / arch.n_layers
    return (arch.n_layers - 1) / arch.n_layers


def _restore_plan(job: Job, record: dict) -> None:
    from irc.routing import route

    job.plan = RoutingPlan.from_dict(record["plan"])
    job.routed = route(job.base, job.plan)


def _lff_data(job: Job) -> None:
    job.windows["lff"] = job.take(job.config.lff_windows, job.config.lff_seq_len)


def _lff(job: Job) -> dict:
    from irc.train.lff_fit import LFFFitConfig, fit_closed_form, fit_smoothl1

    c, routed, windows = job.config, job.routed, job.windows["lff"]
    fit_cfg = LFFFitConfig(method=c.lff_method)
    if c.lff_method != "closed-form":
        return {"method": "smoothl1", **fit_smoothl1(routed, windows, fit_cfg, show_progress=job.show_progress)}
    stats = fit_closed_form(routed, windows, fit_cfg, show_progress=job.show_progress)
    rel = sorted(s["relative_error"] for s in stats.values())
    if c.lff_activation == "silu":
        fit_smoothl1(routed, windows, fit_cfg, init=False, steps=fit_cfg.steps, show_progress=job.show_progress)
    return {"method": "closed-form", "tokens_per_unit": next(iter(stats.values()))["tokens"],
            "relative_error_median": rel[len(rel) // 2], "relative_error_range": [rel[0], rel[-1]]}


def _init_data(job: Job) -> None:
    job.windows["init"] = job.take(job.config.init_windows, job.config.lff_seq_len)


def _init(job: Job) -> dict:
    from irc.train.router_init import init_routers

    return init_routers(job.routed, job.windows["init"], job.nominal_sparsity(), show_progress=job.show_progress)


def _routers_data(job: Job) -> None:
    c = job.config
    remaining = (len(job.stream) - job.cursor) // c.train_seq_len
    job.windows["routers"] = job.take(min(remaining, c.router_steps * c.batch_size), c.train_seq_len)


def _routers(job: Job) -> dict:
    from irc.train.router_train import RouterTrainConfig, load_state, save_state, train_routers

    c, routed = job.config, job.routed
    budget = job.budget(c.train_seq_len) if job.plan.variant in ("informed", "skip") else None
    train_cfg = RouterTrainConfig(sparsity=job.nominal_sparsity(), steps=c.router_steps, batch_size=c.batch_size,
                                  lr=c.lr, checkpoint_every=c.checkpoint_every, budget=budget)
    progress_file = "routers-progress.safetensors"
    state = None
    if job.work.has(progress_file):
        state = on_main(lambda: load_state(job.work.path(progress_file)))
        job.log(f"stage routers: resuming at step {state.step} of {train_cfg.steps}")

    def checkpoint(snapshot):
        on_main(lambda: save_state(snapshot, job.work.path(progress_file)))
        job.on_stage("routers-checkpoint", {"step": snapshot.step})

    if state is None or state.step < train_cfg.steps:
        state = train_routers(routed, job.windows["routers"], train_cfg, resume=state, on_checkpoint=checkpoint,
                              show_progress=job.show_progress)
    else:
        for name, unit in routed.units.items():
            unit.router.load_state_dict({k[len(name) + 1 :]: v for k, v in state.routers.items()
                                         if k.startswith(name + ".")})
    return {"steps": state.step, "budget": budget.kind if budget else "sparsity",
            "exec_target": round(train_cfg.exec_target, 5), "last": state.history[-1] if state.history else None}


def _lora_data(job: Job) -> None:
    job.windows["lora"] = _later_windows(job, job.config.lora_steps, "LoRA")


def _later_windows(job: Job, steps: int, what: str) -> torch.Tensor:
    """``steps`` batches of windows after the ones taken so far; where the stream runs out (router
    training may take all of it), the rest are the routers' windows again, from their first: seen
    data, a fixed order."""
    c = job.config
    need = steps * c.batch_size
    fresh = job.take(min((len(job.stream) - job.cursor) // c.train_seq_len, need), c.train_seq_len)
    if len(fresh) < need:
        seen = job.windows.get("routers")
        if seen is None or len(seen) == 0 or seen.shape[1] != c.train_seq_len:
            raise UserError(f"the training data leaves no windows of {c.train_seq_len} tokens for {what}; "
                            "use more data or fewer router steps")
        again = seen[torch.arange(need - len(fresh)) % len(seen)]
        fresh = torch.cat([fresh, again]) if len(fresh) else again
    return fresh


def _lora(job: Job) -> dict:
    """LoRA with the routers frozen. ``threshold`` routing calibrates first (the decisions it trains
    under are the budget's); the calibrate stage after it recalibrates to the adapted model."""
    from irc.train.lora_train import LoRATrainConfig, train_lora

    c = job.config
    routing = "train" if job.plan.variant == "mod" else c.lora_routing
    if routing == "threshold":
        _calibrate(job)
    teacher = None
    if c.lora_distill > 0:
        def teacher(ids):
            return job.base.model(ids).logits

    return train_lora(job.routed, job.windows["lora"],
                      LoRATrainConfig(steps=c.lora_steps, batch_size=c.batch_size, lr=c.lora_lr, routing=routing,
                                      distill=c.lora_distill), teacher=teacher, show_progress=job.show_progress)


def _select(job: Job) -> dict:
    from irc.train.static_lff import select_static_units

    c = job.config
    return select_static_units(job.routed, job.calib[: c.static_score_windows], c.flops_saved,
                               seq_len=c.eval_seq_len, show_progress=job.show_progress)


def _calibrate(job: Job) -> dict:
    from irc.eval.calibrate import calibrate_thresholds
    from irc.train.distributed import RANKS

    return calibrate_thresholds(job.routed, job.calib, budget=job.budget(job.calib.shape[1]),
                                show_progress=job.show_progress, ranks=RANKS)


def _fold(job: Job) -> dict:
    """Fold the units whose held-in execute fraction (non-sink tokens) is ≤ ε or ≥ 1 − ε, then
    recalibrate the units that keep their routers so the budget still holds."""
    from irc.train.fold import fold_routed

    c = job.config
    static = c.variant == "static-lff"  # its choice is already constant: fold everything, keep the thresholds
    record = fold_routed(job.routed, job.calib, 0.0 if static else c.fold_epsilon,
                         min_saving=0.0 if static else c.fold_min_saving,
                         budget=None if static else (lambda routed: job.budget(job.calib.shape[1])),
                         show_progress=job.show_progress)
    job.plan = job.routed.plan
    return record


def _refine_data(job: Job) -> None:
    job.windows["refine"] = _later_windows(job, job.config.refine_steps, "refining")


def _refine(job: Job) -> dict:
    """LoRA on the folded model (its folded units' deltas too), under its calibrated decisions,
    then the routers recalibrated to the budget (``irc.train.fold.refine_folded``)."""
    from irc.train.fold import refine_folded
    from irc.train.lora_train import LoRATrainConfig

    c = job.config
    teacher = (lambda ids: job.base.model(ids).logits) if c.lora_distill > 0 else None
    return refine_folded(job.routed, job.windows["refine"],
                         LoRATrainConfig(steps=c.refine_steps, batch_size=c.batch_size, lr=c.lora_lr,
                                         routing="threshold", distill=c.lora_distill),
                         calib=job.calib, budget=lambda routed: job.budget(job.calib.shape[1]), teacher=teacher,
                         show_progress=job.show_progress)


def _restore_fold(job: Job, record: dict) -> None:
    if record["folded"]:
        job.routed.fold(record["folded"])
    job.plan = job.routed.plan


def _evaluate(job: Job) -> dict:
    from irc.eval import evaluate_perplexity
    from irc.eval.routed import evaluate_routed
    from irc.train.lff_fit import forecaster_errors

    c, routed = job.config, job.routed
    heldout = token_stream(load_corpus(c.eval_data, default_split="heldout"), job.base.tokenizer)
    evaluation = {"data": c.eval_data, "seq_len": c.eval_seq_len, "max_tokens": c.eval_tokens}
    if world().distributed:
        return {**evaluation, **_evaluate_sharded(job, heldout)}
    if c.evaluate_dense:
        dense = evaluate_perplexity(job.base.model, heldout, seq_len=c.eval_seq_len, max_tokens=c.eval_tokens,
                                    show_progress=job.show_progress)
        evaluation["dense_perplexity"] = dense.perplexity
    result = evaluate_routed(routed, heldout, seq_len=c.eval_seq_len, max_tokens=c.eval_tokens,
                             sparsity=job.nominal_sparsity() if job.plan.variant == "mod" else None,
                             show_progress=job.show_progress)
    evaluation.update({"perplexity": result["perplexity"], "tokens": result["tokens"],
                       "sparsity": result["sparsity"], "flops_per_token": result["flops_per_token"],
                       "routers": len(routed.units), "folded": len(getattr(routed, "folded", {}))})
    if c.variant in ("informed", "static-lff") and routed.units:
        evaluation["lff_relative_error"] = {k: round(v, 4) for k, v in forecaster_errors(routed, job.calib[:1]).items()}
    return evaluation


def _evaluate_sharded(job: Job, heldout: np.ndarray) -> dict:
    """Many processes: each rank scores its contiguous run of the evaluation windows (windows
    of ``eval_seq_len`` that do not overlap, so the split changes none of them); NLL sums,
    token counts and the units' counters are summed over ranks."""
    import math

    from irc.eval import evaluate_perplexity
    from irc.eval.routed import evaluate_routed, routed_flops
    from irc.eval.sparsity import achieved_sparsity
    from irc.train.distributed import all_reduce_scalars, shard_slice, sum_unit_counters
    from irc.train.lff_fit import forecaster_errors

    c, routed, L = job.config, job.routed, job.config.eval_seq_len
    stream = heldout[: c.eval_tokens]
    if len(stream) < 2:
        raise UserError(f"too few tokens to evaluate ({len(stream)})")
    mine = shard_slice(-(-len(stream) // L))
    part = stream[mine.start * L : min(mine.stop * L, len(stream))]

    def perplexity(evaluate) -> tuple[float, int]:
        result = evaluate(part) if len(part) >= 2 else None
        local = (result["nll"] * result["tokens"], result["tokens"]) if result else (0.0, 0)
        nll, tokens = all_reduce_scalars(local)
        return math.exp(nll / tokens), int(tokens)

    evaluation = {}
    if c.evaluate_dense:
        evaluation["dense_perplexity"], _ = perplexity(lambda t: evaluate_perplexity(
            job.base.model, t, seq_len=L, show_progress=job.show_progress).to_dict())
    routed.reset_stats()
    ppl, tokens = perplexity(lambda t: evaluate_routed(
        routed, t, seq_len=L, sparsity=job.nominal_sparsity() if job.plan.variant == "mod" else None,
        show_progress=job.show_progress))
    sum_unit_counters(routed)
    evaluation.update({"perplexity": ppl, "tokens": tokens, "sparsity": achieved_sparsity(routed),
                       "flops_per_token": routed_flops(routed, L),
                       "routers": len(routed.units), "folded": len(getattr(routed, "folded", {}))})
    if c.variant in ("informed", "static-lff") and routed.units:
        evaluation["lff_relative_error"] = {k: round(v, 4) for k, v in forecaster_errors(routed, job.calib[:1]).items()}
    return evaluation


def _learned(c: ConvertConfig) -> bool:
    return c.variant in ("informed", "skip", "mod") and (c.sparsity or c.flops_saved or 0) > 0


# The job, in order. A stage runs when ``applies(config)``; each is checkpointed.
STAGES: list[Stage] = [
    Stage("plan", lambda c: True, _plan, ("training", "plan"), restore=_restore_plan,
          settings=lambda c: {"lora_rank": c.plan().lora_rank}),
    Stage("lff", lambda c: c.variant in ("informed", "static-lff"), _lff, ("training", "lff"), data=_lff_data),
    Stage("init", lambda c: c.variant == "informed" and c.router_init, _init, ("training", "router_init"),
          data=_init_data),
    Stage("routers", _learned, _routers, ("training", "routers"), data=_routers_data),
    Stage("lora", lambda c: c.lora_steps > 0 and c.variant not in ("static", "static-lff"), _lora,
          ("training", "lora"), data=_lora_data,
          settings=lambda c: {k: getattr(c, k) for k in ("lora_steps", "lora_lr", "lora_routing", "lora_distill")}),
    Stage("select", lambda c: c.variant == "static-lff", _select, ("training", "static_lff"),
          settings=lambda c: {"static_score_windows": c.static_score_windows}),
    Stage("calibrate", lambda c: c.variant in ("informed", "skip"), _calibrate, ("calibration",)),
    Stage("fold", lambda c: c.variant == "static-lff" or (c.fold_epsilon is not None and c.variant
                                                            in ("informed", "skip")),
          _fold, ("fold",), restore=_restore_fold,
          settings=lambda c: {"fold_epsilon": c.fold_epsilon, "fold_min_saving": c.fold_min_saving}),
    Stage("refine", lambda c: c.refine_steps > 0, _refine, ("training", "refine"), data=_refine_data,
          settings=lambda c: {"refine_steps": c.refine_steps}),
    Stage("evaluate", lambda c: True, _evaluate, ("evaluation",),
          settings=lambda c: {k: getattr(c, k) for k in ("eval_data", "eval_seq_len", "eval_tokens", "evaluate_dense")}),
]
# What may change between a run and its --resume: the later stages' settings (LoRA, static-lff
# scoring, folding, evaluation). The stages before the first one whose settings changed keep
# their checkpoints; that one and every later one run again. Anything else must match.
LATE_SETTINGS = ("lora_steps", "lora_rank", "lora_lr", "lora_routing", "lora_distill", "static_score_windows",
                 "fold_epsilon", "fold_min_saving", "refine_steps", "eval_data", "eval_seq_len", "eval_tokens", "evaluate_dense")


def _put(records: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        records = records.setdefault(key, {})
    records[path[-1]] = value


def split_held_in(stream: np.ndarray, config: ConvertConfig) -> tuple[np.ndarray, torch.Tensor]:
    """The training stream and the held-in windows (its last ``calib_windows``, never trained on):
    calibration, static-lff scoring and fold evidence."""
    from irc.data.windows import make_windows

    held = config.calib_windows * config.lff_seq_len
    return stream[: len(stream) - held], make_windows(stream[len(stream) - held :], config.lff_seq_len,
                                                      config.calib_windows)


def convert(source: str, out: str | Path, config: ConvertConfig, *, resume: bool = False, overwrite: bool = False,
            show_progress: bool = True, log=print, on_stage=None) -> dict:
    """Convert ``source`` into a routed model directory ``out``; returns the run's summary.

    ``on_stage(name, info)`` is called after every stage and router checkpoint
    (for progress reporting; raising from it interrupts the run like a kill would).
    """
    from irc.eval.routed import inference_mode
    from irc.models import load_model

    out = Path(out)
    w = world()
    if not w.is_main:  # many processes: rank 0 alone reports
        show_progress, log = False, (lambda line: None)

    def check_out():
        if out.exists() and not overwrite:
            raise UserError(f"{out} already exists; choose another directory or pass --overwrite")

    on_main(check_out)
    if w.size > config.batch_size and (_learned(config) or config.lora_steps > 0):
        raise UserError(f"a batch of {config.batch_size} rows cannot be split over {w.size} processes (each "
                        f"needs a row of every training batch); use at most {config.batch_size} processes or a larger "
                        "--batch-size")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    # many processes: rank 0 loads first (a first run dequantises and caches the model, fetches and
    # caches the corpus), the others then read its caches; a failure stops them all
    first: dict = {}

    def load():
        first["base"] = base = load_model(source, dtype=config.dtype)
        first["stream"] = token_stream(load_corpus(config.data, default_split="train"), base.tokenizer)

    on_main(load)
    base = first["base"] if w.is_main else load_model(source, dtype=config.dtype)
    stream = first["stream"] if w.is_main else token_stream(load_corpus(config.data, default_split="train"),
                                                            base.tokenizer)
    longest = max(config.lff_seq_len, config.train_seq_len, config.eval_seq_len)
    if base.arch.max_positions and longest > base.arch.max_positions:
        raise UserError(f"windows of {longest} tokens are longer than the model's {base.arch.max_positions} "
                        "positions; use shorter windows")
    work = _Work(out, config, str(source), resume)
    train, calib = split_held_in(stream, config)
    job = Job(config=config, source=str(source), base=base, stream=train, calib=calib,
              work=work, log=log, show_progress=show_progress, on_stage=on_stage or (lambda name, info: None))
    job.records = {"training": {"config": config.to_dict(), "sparsity": config.sparsity,
                                "flops_saved": config.flops_saved}}
    seconds: dict[str, float] = {}
    rerun = False  # once a stage runs, no later checkpoint is reused
    for stage in STAGES:
        if not stage.applies(config):
            continue
        if stage.data is not None:
            stage.data(job)
        t = time.perf_counter()
        checkpoint = f"stage-{stage.name}"
        settings = stage.settings(config)
        saved = work.read_json(checkpoint + ".json") if not rerun and work.has(checkpoint + ".json") else None
        if saved is not None:
            if not isinstance(saved, dict) or not {"record", "seconds"} <= saved.keys():
                raise UserError(f"checkpoint {work.path(checkpoint + '.json')} is corrupt (not a stage record); "
                                "run without --resume")
            before = saved.get("settings", {})
            if any(before.get(k, v) != v for k, v in settings.items()):
                changed = ", ".join(f"{k} {before.get(k)} → {v}" for k, v in settings.items() if before.get(k, v) != v)
                log(f"stage {stage.name}: settings changed ({changed}); running it and the stages after it again")
                work.discard_from([st.name for st in STAGES[STAGES.index(stage):]])
                saved, rerun = None, True
        if saved is not None:
            if stage.restore is not None:
                stage.restore(job, saved["record"])
            if work.has(checkpoint + ".safetensors"):
                work.load_routing(checkpoint + ".safetensors", job.routed)
            record, seconds[stage.name] = saved["record"], saved["seconds"]
            log(f"stage {stage.name}: resumed from checkpoint")
        else:
            record = broadcast_object(stage.run(job))  # many processes: rank 0's record (they agree)
            seconds[stage.name] = broadcast_object(round(time.perf_counter() - t, 1))
            if job.routed is not None:
                work.save_routing(checkpoint + ".safetensors", job.routed)
            work.write_json(checkpoint + ".json", {"record": record, "seconds": seconds[stage.name],
                                                   "settings": settings})
            rerun = True  # later checkpoints (if any) came after another run of this stage
        if stage.record_at and record is not None:
            _put(job.records, stage.record_at, record)
        job.on_stage(stage.name, {})
    records = job.records
    plan_record = records["training"].pop("plan", {})
    if "block_influence" in plan_record:
        records["training"]["block_influence"] = plan_record["block_influence"]
    if job.plan.variant == "mod":
        records["training"]["nominal_sparsity"] = job.nominal_sparsity()
    records["training"]["seconds"] = seconds
    records["training"]["total_seconds"] = round(time.perf_counter() - start, 1)
    routed = job.routed
    inference_mode(routed, job.nominal_sparsity() if job.plan.variant == "mod" else None)
    routed.records = records
    on_main(lambda: routed.save(out, overwrite=overwrite))
    work.remove()
    return {"out": str(out), **records}
