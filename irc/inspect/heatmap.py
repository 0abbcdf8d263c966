"""What the routers learned: a prompt's routing decisions as a tokens × units heat map.

``routing_heatmap`` runs one prompt through a routed model in its inference mode
(``threshold``; ``capacity`` for Mixture-of-Depths, as ``irc eval`` runs it) and
records, per unit (rows, graph order) and prompt token (columns), what happened:

- ``execute``: the unit ran on the token;
- ``approximate``: the forecaster stood in (skip: the unit contributed nothing;
  ``static``: the layer is dropped);
- ``sink``: one of the first ``n_sink`` tokens, which always execute;
- ``folded``: the unit no longer routes (``RoutedModel.folded``: forecaster-only
  or plain); its sinks still show as ``sink``.

Beside each row: the unit's execute fraction on a larger body of text, taken
from the directory's records when it has them (calibration: held-in; evaluation:
the held-out split) and otherwise measured on held-in windows (the last 4
windows of 1024 tokens of the convert's training data, ``wiki:train`` by
default). The figure says which.

The decisions are the very tensors the units count: each unit's ``_count`` (the
counter update every routing decision passes through) is wrapped for the run,
so every mode and variant is recorded exactly, with no second copy of the
decision rule. The model's routing settings and counters are restored after.

Legend: U units (rows), T prompt tokens (columns).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from irc.errors import UserError

APPROXIMATE, EXECUTE, SINK, FOLDED = 0, 1, 2, 3
LEGEND = ("approximate", "execute", "sink", "folded")
COLOURS = ("#f4a259", "#2f6ea5", "#8c8c8c", "#9b6fc3")  # in LEGEND order
SUFFIXES = (".png", ".svg")
MAX_TOKENS = 256  # beyond this, columns are too narrow to read
HELD_IN_WINDOWS, HELD_IN_SEQ_LEN, HELD_IN_DATA = 4, 1024, "wiki:train"


def check_heatmap_path(path: str | Path) -> Path:
    """``path`` if a heat map can be written there; a ``UserError`` saying why not otherwise.

    Cheap (no model is loaded): the CLI calls it before anything else.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"--heatmap writes .png or .svg files, got {str(path)!r}; name the file e.g. routing.png")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"--heatmap: the directory {str(parent)!r} of {str(path)!r} does not exist; create it first")
    if path.is_dir():
        raise UserError(f"--heatmap: {str(path)!r} is a directory; give a file name ending in .png or .svg")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"--heatmap: cannot write into {str(parent)!r} ({e.strerror}); choose another directory") from e
    return path


def routing_heatmap(routed, text: str, path: str | Path | None = None, *,
                    held_in: Mapping[str, float | None] | torch.Tensor | str | None = None,
                    title: str | None = None, show_progress: bool = False) -> dict:
    """Route ``text``, record every unit's decision per token, and draw them to ``path`` (.png/.svg).

    ``held_in`` gives the execute fraction shown beside each row: ``None`` takes
    it from ``routed.records`` when present and otherwise measures it on held-in
    windows (needs that corpus); ``"measure"`` always measures; a tensor of token
    windows ``[N, T]`` measures on those; a mapping unit name → fraction is shown
    as given. Returns the decisions (codes indexing ``LEGEND``), labels and
    figures as a JSON-able dict; ``path=None`` draws nothing.
    """
    if path is not None:
        path = check_heatmap_path(path)
    ids = torch.tensor([routed.tokenizer(text).input_ids], dtype=torch.long)  # [1, T]
    T = ids.shape[1]
    if T == 0:
        raise UserError("--prompt is empty after tokenisation; give some text")
    if T > MAX_TOKENS:
        raise UserError(f"--prompt is {T} tokens long; a heat map draws at most {MAX_TOKENS}: shorten it")
    fractions, source = _held_in(routed, held_in, show_progress)
    rows = _rows(routed)
    decisions, executed, mode = _prompt_decisions(routed, rows, ids)
    tok = routed.tokenizer
    result = {
        "prompt": text,
        "tokens": [_token_label(tok.decode([int(i)])) for i in ids[0]],
        "token_ids": ids[0].tolist(),
        # executed: how many prompt tokens the unit ran on (what its counter adds)
        "units": [{"name": name, **_layer_kind(name, unit), "folded": how, "executed": executed[name],
                   "execute_fraction": fractions.get(name)} for name, unit, how in rows],
        "legend": list(LEGEND),
        "decisions": [decisions[name] for name, _, _ in rows],  # [U][T]
        "execute_fraction_source": source,
        "mode": mode,
        "path": None if path is None else str(path),
    }
    if path is not None:
        draw_heatmap(result, path, title=title)
    return result


# --- recording ----------------------------------------------------------------


def _rows(routed) -> list[tuple[str, torch.nn.Module, str | None]]:
    """(name, module, folded how or None) of every unit, routed or folded, in graph order."""
    units = dict(routed.units)
    folded = dict(getattr(routed, "folded", None) or {})
    order = {name: i for i, (name, _) in enumerate(routed.gm.named_children())}
    names = sorted({*units, *folded}, key=lambda n: (order.get(n, len(order)), n))
    return [(n, units.get(n, folded.get(n)), None if n in units else str(getattr(folded[n], "how", "folded")))
            for n in names]


def _layer_kind(name: str, unit) -> dict:
    """Layer and kind of a unit; from its name (``layer3_mlp``, ``layer3``) for modules without them."""
    head, _, kind = name.partition("_")
    layer = getattr(unit, "layer", None)
    return {"layer": int(head.removeprefix("layer")) if layer is None else layer,
            "kind": getattr(unit, "kind", None) or kind or "layer"}


@contextlib.contextmanager
def _routing_kept(routed) -> Iterator[None]:
    """Restore every unit's mode, settings and counters when the block ends."""
    keys = ("mode", "record", "sparse", "capacity", "tau", "forced_mask", "executed", "tokens")
    modules = [m for _, m, _ in _rows(routed)]
    saved = [{k: getattr(m, k) for k in keys if hasattr(m, k)} for m in modules]
    try:
        yield
    finally:
        for m, state in zip(modules, saved, strict=True):
            for k, v in state.items():
                setattr(m, k, v)


@contextlib.contextmanager
def _decisions_recorded(units: Mapping[str, torch.nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Each unit's execute mask ``[B, T]`` per forward, as its counters see it."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in units}
    for name, unit in units.items():
        def count(execute, pad, _original=unit._count, _name=name):
            seen[_name].append(execute.detach().to("cpu", torch.bool))
            _original(execute, pad)
        unit._count = count  # an instance attribute: shadows the method for this run only
    try:
        yield seen
    finally:
        for unit in units.values():
            unit.__dict__.pop("_count", None)


def _device(routed) -> torch.device:
    return next(routed.gm.parameters()).device


@torch.no_grad()
def _prompt_decisions(routed, rows, ids: torch.Tensor) -> tuple[dict[str, list[int]], dict[str, int | None], str]:
    """Per unit: the decision codes ``[T]``, the number of tokens executed (what its counter adds), the mode."""
    from irc.eval.routed import inference_mode
    from irc.nn.tokens import sink_mask

    mask = torch.ones_like(ids)  # [1, T]: one prompt, no padding
    counted = {name: unit for name, unit, _ in rows if hasattr(unit, "_count")}
    with _routing_kept(routed), _decisions_recorded(counted) as seen:
        inference_mode(routed)
        routed(ids.to(_device(routed)), mask.to(_device(routed)))
        mode = next((u.mode for u in routed.units.values()), "threshold")
    decisions, executed = {}, {}
    for name, unit, how in rows:
        sinks = sink_mask(mask.bool(), getattr(unit, "n_sink", routed.plan.n_sink))[0]  # [T]
        execute = seen[name][0][0] if seen.get(name) else None  # [T]
        if how is not None:  # folded: sinks run (forecast) or everything runs (plain); no decision to show
            row = torch.where(sinks, SINK, FOLDED)
        elif execute is not None:
            row = torch.where(execute, torch.where(sinks, SINK, EXECUTE), APPROXIMATE)
        elif getattr(unit, "static", False):  # ShortGPT: the layer is dropped for every token
            row = torch.full_like(sinks, APPROXIMATE, dtype=torch.long)
            execute = torch.zeros_like(sinks)
        else:
            raise RuntimeError(f"{name} ran without recording a routing decision (mode {unit.mode})")
        decisions[name] = [int(c) for c in row]
        executed[name] = None if execute is None else int(execute.sum())
    return decisions, executed, mode


# --- execute fractions beside the rows -------------------------------------------


def _held_in(routed, held_in, show_progress: bool) -> tuple[dict[str, float | None], str]:
    if isinstance(held_in, Mapping):
        return dict(held_in), "given"
    if isinstance(held_in, torch.Tensor):
        n, t = held_in.shape
        return measure_fractions(routed, held_in, show_progress), f"measured on {n} given windows of {t} tokens"
    if held_in not in (None, "measure"):
        raise ValueError(f"held_in must be None, 'measure', a tensor of windows or a mapping, got {held_in!r}")
    if held_in is None:
        recorded = recorded_fractions(routed.records)
        if recorded is not None:
            return recorded
    windows, where = held_in_windows(routed)
    return measure_fractions(routed, windows, show_progress), f"held-in, measured on {where}"


def recorded_fractions(records: Mapping) -> tuple[dict[str, float | None], str] | None:
    """Per-unit execute fractions saved in ``irc.json`` (calibration first: it is held-in data)."""
    config = records.get("training", {}).get("config", {})
    sections = (
        ("calibration", "held-in, from the calibration records "
         f"({config.get('calib_windows', '?')} windows of {config.get('data', '?')})"),
        ("evaluation", "held-out, from the evaluation records "
         f"({records.get('evaluation', {}).get('data', '?')}, {_count(records.get('evaluation', {}).get('tokens'))} tokens)"),
    )
    for key, label in sections:
        section = records.get(key) or {}
        by_unit = (section.get("sparsity") or {}).get("by_unit") or section.get("by_unit")
        if by_unit:
            return {n: None if s is None else 1.0 - s for n, s in by_unit.items()}, label
    return None


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def held_in_windows(routed) -> tuple[torch.Tensor, str]:
    """The last 4 windows of 1024 tokens of the convert's training data (``wiki:train`` when unrecorded):
    the windows ``irc convert`` calibrates on, which training never sees."""
    from irc.data import load_corpus, token_stream
    from irc.data.windows import make_windows

    config = routed.records.get("training", {}).get("config", {})
    data = config.get("data", HELD_IN_DATA)
    count = int(config.get("calib_windows", HELD_IN_WINDOWS))
    seq_len = int(config.get("lff_seq_len", HELD_IN_SEQ_LEN))
    if routed.arch.max_positions:
        seq_len = min(seq_len, routed.arch.max_positions)
    stream = token_stream(load_corpus(data, default_split="train"), routed.tokenizer)
    if len(stream) < count * seq_len:
        raise UserError(f"{data} holds {len(stream):,} tokens; the held-in execute fractions need "
                        f"{count} windows of {seq_len}")
    windows = make_windows(stream[len(stream) - count * seq_len :], seq_len, count)
    return windows, f"the last {count} windows of {seq_len} tokens of {data}"


@torch.no_grad()
def measure_fractions(routed, windows: torch.Tensor, show_progress: bool = False) -> dict[str, float | None]:
    """Each unit's execute fraction over ``windows [N, T]``, in the inference mode, one window at a time."""
    from irc.eval.routed import inference_mode
    from irc.progress import progress

    rows = _rows(routed)
    with _routing_kept(routed):
        inference_mode(routed)
        for _, m, _ in rows:
            if hasattr(m, "reset_stats"):
                m.reset_stats()
        for w in progress(windows, desc="held-in execute fractions", unit="window", enabled=show_progress):
            routed(w.unsqueeze(0).to(_device(routed)))
        return {n: (m.executed / m.tokens if getattr(m, "tokens", 0) else None) for n, m, _ in rows}


# --- drawing ---------------------------------------------------------------------------


def _token_label(text: str) -> str:
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not shown.strip():
        shown = shown.replace(" ", "␣")  # a bare space would be an invisible label
    return shown or "∅"


def draw_heatmap(result: dict, path: str | Path, *, title: str | None = None) -> Path:
    """Draw a ``routing_heatmap`` result to ``path`` (.png or .svg), atomically (Agg canvas, no pyplot)."""
    import warnings

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from irc.cache import atomic_file

    path = check_heatmap_path(path)
    tokens, units, matrix = result["tokens"], result["units"], result["decisions"]
    U, T = len(units), len(tokens)
    cell = 0.2  # inches per token column and per unit row
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "irc", "font.size": 8}):
        fig = Figure(figsize=(3.2 + cell * T + 1.4, 2.0 + cell * U + 0.08 * max(len(t) for t in tokens)),
                     layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(1, 2, width_ratios=[max(T, 1), 7])
        ax = fig.add_subplot(grid[0])
        ax.imshow(matrix, cmap=ListedColormap(COLOURS), norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], 4),
                  aspect="auto", interpolation="nearest")  # [U, T]
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=7, parse_math=False)
        ax.set_yticks(range(U), [_row_label(u) for u in units], parse_math=False)
        ax.set_xticks([x - 0.5 for x in range(1, T)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, U)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("prompt token")
        ax.set_ylim(U - 0.5, -0.5)  # first unit on top; the bars share these limits

        bars = fig.add_subplot(grid[1], sharey=ax)
        values = [u["execute_fraction"] for u in units]
        bars.barh(range(U), [v or 0.0 for v in values], height=0.7, color=COLOURS[EXECUTE], alpha=0.55)
        for y, v in enumerate(values):
            bars.text(1.02, y, "–" if v is None else f"{v:.2f}", va="center", fontsize=7, parse_math=False)
        bars.set_xlim(0, 1.3)
        bars.set_xticks([0, 0.5, 1])
        bars.tick_params(axis="y", left=False, labelleft=False)
        bars.spines[["top", "right"]].set_visible(False)
        bars.set_title("execute\nfraction", fontsize=8)
        bars.set_xlabel(_wrap(result["execute_fraction_source"], 34), fontsize=6, parse_math=False)

        shown = [i for i in range(len(LEGEND)) if i != FOLDED or any(u["folded"] for u in units)]
        fig.legend(handles=[Patch(color=COLOURS[i], label=LEGEND[i]) for i in shown], loc="outside lower center",
                   ncol=len(shown), frameon=False)
        fig.suptitle(title or f"routing decisions ({result['mode']} mode)", parse_math=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from")  # tokens in scripts the font lacks
            with atomic_file(path, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # a user's file, not a private temporary
                fig.savefig(f, format=path.suffix.lower()[1:], dpi=150,
                            metadata={"Date": None} if path.suffix.lower() == ".svg" else None)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _row_label(unit: dict) -> str:
    label = f"layer {unit['layer']} {unit['kind']}"
    return label if unit["folded"] is None else f"{label} (folded: {unit['folded']})"


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
