"""``irc convert``: capture, rewrite, train, calibrate, evaluate and save, resumably.

Stages (each checkpointed into a work directory beside OUT):

1. ``lff``        — forecaster fit (informed only; closed form by default);
2. ``init``       — router init from forecast error (informed, optional);
3. ``routers``    — router training (informed, skip, mod), checkpointed every few steps;
   ``lora``       — LoRA on q/v/gate projections, routers frozen (optional, ``lora_steps``);
4. ``calibrate``  — thresholds for the target sparsity (informed, skip);
then evaluation (dense and routed perplexity, achieved sparsity, FLOPs) and an
atomic save of OUT. ``static`` (ShortGPT) only measures block influence.

``resume=True`` continues from the last checkpoint of a run with the same
configuration and reaches the same result as an uninterrupted run: stage
outputs are saved whole, router training saves its optimizer and RNG state, and
the data each step sees is a function of the step. OUT is written only at the
end, atomically: a failed or interrupted run leaves no OUT, only the work
directory that ``--resume`` picks up.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from irc.cache import atomic_file, write_json_atomic
from irc.data import load_corpus, token_stream
from irc.errors import UserError
from irc.plan import RoutingPlan

PRESETS: dict[str, dict] = {
    # the demo: a few minutes on a 2-core CPU
    "quick": dict(lff_windows=8, init_windows=4, router_steps=60, batch_size=2, train_seq_len=512,
                  calib_windows=4),
    # the benchmark setting
    "standard": dict(lff_windows=24, init_windows=8, router_steps=300, batch_size=4, train_seq_len=512,
                     calib_windows=8),
}
STAGES = ("lff", "init", "routers", "calibrate")


@dataclass(frozen=True)
class ConvertConfig:
    sparsity: float
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
    lora_steps: int = 0  # stage 4: LoRA (rank 16, α 32, q/v/gate projections); 0 skips it
    lora_rank: int = 16
    eval_seq_len: int = 1024
    eval_tokens: int = 20480
    evaluate_dense: bool = True

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        if self.variant not in ("informed", "skip", "mod", "static"):
            raise UserError(f"unknown variant {self.variant!r}; expected informed, skip, mod or static")

    @classmethod
    def from_preset(cls, sparsity: float, preset: str = "quick", **overrides) -> ConvertConfig:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        return cls(sparsity=sparsity, preset=preset, **{**PRESETS[preset], **overrides})

    def plan(self) -> RoutingPlan:
        return RoutingPlan(variant=self.variant if self.variant != "static" else "informed",
                           lff_rank=self.lff_rank, lff_activation=self.lff_activation,
                           n_sink=self.n_sink, kv_policy=self.kv_policy,
                           capacity=max(1.0 - self.sparsity, 1e-3),
                           lora_rank=self.lora_rank if self.lora_steps > 0 and self.variant != "static" else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ConvertConfig:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


class _Work:
    """The work directory: stage checkpoints and the configuration they belong to."""

    def __init__(self, out: Path, config: ConvertConfig, source: str, resume: bool):
        self.dir = out.parent / f".{out.name}.irc-work"
        key = {"config": config.to_dict(), "source": source}
        meta = self.dir / "run.json"
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        if resume and meta.is_file():
            recorded = json.loads(meta.read_text())
            if recorded != key:
                raise UserError(f"--resume: the checkpoints in {self.dir} belong to another configuration "
                                "or model; run without --resume to start over")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(meta, key)

    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def save_routing(self, name: str, routed) -> None:
        from safetensors.torch import save

        state = {k: v.detach().contiguous().cpu() for k, v in routed.routing_state().items()}
        with atomic_file(self.path(name), "wb") as f:
            f.write(save(state))

    def load_routing(self, name: str, routed) -> None:
        from safetensors.torch import load_file

        routed.load_routing_state(load_file(self.path(name)))

    def save_obj(self, name: str, obj) -> None:
        with atomic_file(self.path(name), "wb") as f:
            torch.save(obj, f)

    def load_obj(self, name: str):
        return torch.load(self.path(name), weights_only=False)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def convert(source: str, out: str | Path, config: ConvertConfig, *, resume: bool = False, overwrite: bool = False,
            show_progress: bool = True, log=print, on_stage=None) -> dict:
    """Convert ``source`` into a routed model directory ``out``; returns the run's summary.

    ``on_stage(name, info)`` is called after every stage and router checkpoint
    (for progress reporting; raising from it interrupts the run like a kill would).
    """
    from irc.eval import evaluate_perplexity
    from irc.eval.routed import evaluate_routed
    from irc.models import load_model
    from irc.routing import route
    from irc.train.calibrate import calibrate_thresholds
    from irc.train.lff_fit import LFFFitConfig, fit_closed_form, fit_smoothl1, forecaster_errors
    from irc.train.router_init import init_routers
    from irc.train.router_train import RouterTrainConfig, train_routers
    from irc.train.static import block_influence, layers_to_drop
    from irc.train.windows import make_windows

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another directory or pass --overwrite")
    on_stage = on_stage or (lambda name, info: None)
    start = time.perf_counter()
    times: dict[str, float] = {}
    records: dict = {"training": {"config": config.to_dict(), "sparsity": config.sparsity}}
    torch.manual_seed(config.seed)
    base = load_model(source, dtype=config.dtype)
    longest = max(config.lff_seq_len, config.train_seq_len, config.eval_seq_len)
    if base.arch.max_positions and longest > base.arch.max_positions:
        raise UserError(f"windows of {longest} tokens are longer than the model's {base.arch.max_positions} "
                        "positions; use shorter windows")
    work = _Work(out, config, str(source), resume)
    stream = token_stream(load_corpus(config.data, default_split="train"), base.tokenizer)
    cursor = 0

    def take(count: int, seq_len: int):
        nonlocal cursor
        w = make_windows(stream, seq_len, count, start=cursor)
        cursor += count * seq_len
        return w

    calib = make_windows(stream[len(stream) - config.calib_windows * config.lff_seq_len :], config.lff_seq_len,
                         config.calib_windows)
    stream = stream[: len(stream) - config.calib_windows * config.lff_seq_len]  # the rest never sees calibration
    plan = config.plan()
    if config.variant == "static":
        t = time.perf_counter()
        influence = block_influence(base.model, calib)
        plan = replace(plan, variant="static", layers=layers_to_drop(influence, config.sparsity))
        records["training"]["block_influence"] = [round(x, 5) for x in influence]
        times["block_influence"] = time.perf_counter() - t
        log(f"static: dropping layers {list(plan.layers)} (lowest block influence)")
    routed = route(base, plan)

    def stage(name: str, run) -> None:
        """Run ``run()`` unless the stage's checkpoint exists; then save it, time it, report it."""
        t = time.perf_counter()
        checkpoint = f"stage-{name}.safetensors"
        if work.has(checkpoint):
            work.load_routing(checkpoint, routed)
            log(f"stage {name}: resumed from checkpoint")
        else:
            run()
            work.save_routing(checkpoint, routed)
        times[name] = time.perf_counter() - t
        on_stage(name, {})

    if config.variant == "informed":
        lff_windows = take(config.lff_windows, config.lff_seq_len)

        def fit() -> None:
            fit_cfg = LFFFitConfig(method=config.lff_method)
            if config.lff_method == "closed-form":
                stats = fit_closed_form(routed, lff_windows, fit_cfg, show_progress=show_progress)
                rel = sorted(s["relative_error"] for s in stats.values())
                records["training"]["lff"] = {"method": "closed-form",
                                              "tokens_per_unit": next(iter(stats.values()))["tokens"],
                                              "relative_error_median": rel[len(rel) // 2],
                                              "relative_error_range": [rel[0], rel[-1]]}
                if config.lff_activation == "silu":
                    fit_smoothl1(routed, lff_windows, fit_cfg, init=False, steps=fit_cfg.steps,
                                 show_progress=show_progress)
            else:
                loss = fit_smoothl1(routed, lff_windows, fit_cfg, show_progress=show_progress)
                records["training"]["lff"] = {"method": "smoothl1", **loss}

        stage("lff", fit)
        if config.router_init:
            init_windows = take(config.init_windows, config.lff_seq_len)
            stage("init", lambda: records["training"].__setitem__(
                "router_init", init_routers(routed, init_windows, config.sparsity, show_progress=show_progress)))

    if config.variant in ("informed", "skip", "mod") and config.sparsity > 0:
        remaining = (len(stream) - cursor) // config.train_seq_len
        train_windows = take(min(remaining, config.router_steps * config.batch_size), config.train_seq_len)
        train_cfg = RouterTrainConfig(sparsity=config.sparsity, steps=config.router_steps,
                                      batch_size=config.batch_size, lr=config.lr,
                                      checkpoint_every=config.checkpoint_every)
        t = time.perf_counter()
        state = None
        if work.has("stage-routers.pt"):
            state = work.load_obj("stage-routers.pt")
            log(f"stage routers: resuming at step {state.step} of {train_cfg.steps}")

        def checkpoint(snapshot):
            work.save_obj("stage-routers.pt", snapshot)
            on_stage("routers-checkpoint", {"step": snapshot.step})

        if state is None or state.step < train_cfg.steps:
            state = train_routers(routed, train_windows, train_cfg, resume=state, on_checkpoint=checkpoint,
                                  show_progress=show_progress)
        else:
            for name, unit in routed.units.items():
                unit.router.load_state_dict({k[len(name) + 1 :]: v for k, v in state.routers.items()
                                             if k.startswith(name + ".")})
        records["training"]["routers"] = {"steps": state.step, "last": state.history[-1] if state.history else None}
        times["routers"] = time.perf_counter() - t
        on_stage("routers", {})

    if config.lora_steps > 0 and plan.lora_rank > 0:
        from irc.train.lora_train import LoRATrainConfig, train_lora

        def lora() -> None:
            lora_windows = take(min((len(stream) - cursor) // config.train_seq_len,
                                    config.lora_steps * config.batch_size), config.train_seq_len)
            records["training"]["lora"] = train_lora(routed, lora_windows, LoRATrainConfig(
                steps=config.lora_steps, batch_size=config.batch_size), show_progress=show_progress)

        stage("lora", lora)

    t = time.perf_counter()
    if work.has("stage-calibrated.safetensors"):
        work.load_routing("stage-calibrated.safetensors", routed)
        records["calibration"] = json.loads(work.path("calibration.json").read_text())
    else:
        records["calibration"] = calibrate_thresholds(routed, calib, config.sparsity, show_progress=show_progress)
        work.save_routing("stage-calibrated.safetensors", routed)
        write_json_atomic(work.path("calibration.json"), records["calibration"])
    times["calibrate"] = time.perf_counter() - t
    on_stage("calibrate", {})

    t = time.perf_counter()
    heldout = token_stream(load_corpus(config.eval_data, default_split="heldout"), base.tokenizer)
    evaluation = {"data": config.eval_data, "seq_len": config.eval_seq_len, "max_tokens": config.eval_tokens}
    if config.evaluate_dense:
        dense = evaluate_perplexity(base.model, heldout, seq_len=config.eval_seq_len, max_tokens=config.eval_tokens,
                                    show_progress=show_progress)
        evaluation["dense_perplexity"] = dense.perplexity
    result = evaluate_routed(routed, heldout, seq_len=config.eval_seq_len, max_tokens=config.eval_tokens,
                             sparsity=config.sparsity, show_progress=show_progress)
    evaluation.update({"perplexity": result["perplexity"], "tokens": result["tokens"],
                       "sparsity": result["sparsity"], "flops_per_token": result["flops_per_token"]})
    if config.variant == "informed":
        evaluation["lff_relative_error"] = {k: round(v, 4) for k, v in forecaster_errors(routed, calib[:1]).items()}
        inference_mode_reset(routed, config)
    times["evaluate"] = time.perf_counter() - t
    records["evaluation"] = evaluation
    records["training"]["seconds"] = {k: round(v, 1) for k, v in times.items()}
    records["training"]["total_seconds"] = round(time.perf_counter() - start, 1)
    routed.records = records
    routed.save(out, overwrite=overwrite)
    work.remove()
    return {"out": str(out), **records}


def inference_mode_reset(routed, config: ConvertConfig) -> None:
    from irc.eval.routed import inference_mode

    inference_mode(routed, config.sparsity)
