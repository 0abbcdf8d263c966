"""``irc inspect --prompt --heatmap``: recorded decisions, the drawn files, bad input."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from routed_helpers import randomize_routing, tiny_routed

import irc
from irc.cli import main
from irc.errors import UserError
from irc.inspect.heatmap import (
    APPROXIMATE,
    EXECUTE,
    FOLDED,
    LEGEND,
    SINK,
    check_heatmap_path,
    routing_heatmap,
)
from irc.nn.tokens import sink_mask
from irc.plan import RoutingPlan

from tiny import sample_text

PROMPT = sample_text()[:90]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _counters_on(routed, text: str) -> dict[str, tuple[int, int]]:
    """(executed, tokens) of every unit after one threshold-mode run of ``text``, from a clean start."""
    ids = torch.tensor([routed.tokenizer(text).input_ids])
    routed.reset_stats()
    routed.set_routing("threshold", record=True)
    with torch.no_grad():
        routed(ids)
    return {n: (u.executed, u.tokens) for n, u in routed.units.items()}


def test_decisions_are_what_the_units_count():
    _, routed = tiny_routed("llama")
    result = routing_heatmap(routed, PROMPT, None, held_in={})
    T = len(result["tokens"])
    assert result["mode"] == "threshold" and result["legend"] == list(LEGEND)
    assert [u["name"] for u in result["units"]] == list(routed.units)  # graph order
    assert routed.units["layer0_attn"].mode == "dense"  # the model's routing settings are restored
    counters = _counters_on(routed, PROMPT)
    codes = set()
    for unit, row in zip(result["units"], result["decisions"], strict=True):
        assert len(row) == T
        codes |= set(row)
        executed = sum(c in (EXECUTE, SINK) for c in row)
        assert (executed, T) == counters[unit["name"]] and unit["executed"] == executed
        assert row[:2] == [SINK, SINK] and SINK not in row[2:]  # n_sink = 2
    assert {EXECUTE, APPROXIMATE} <= codes  # the random routers route both ways: the check is not vacuous


def test_decisions_follow_the_router_margins():
    """An independent reading: execute where logit_exec − logit_approx ≥ θ, or on a sink."""
    _, routed = tiny_routed("qwen2", seed=1)
    for i, unit in enumerate(routed.units.values()):
        unit.threshold.fill_(0.3 * (i - 1))
    margins = {}
    hooks = [u.router.register_forward_hook(
        lambda m, a, out, n=n: margins.__setitem__(n, (out[0, :, 0] - out[0, :, 1]).float()))
        for n, u in routed.units.items()]
    try:
        result = routing_heatmap(routed, PROMPT, None, held_in={})
    finally:
        for h in hooks:
            h.remove()
    for unit, row in zip(result["units"], result["decisions"], strict=True):
        m = routed.units[unit["name"]]
        sinks = sink_mask(torch.ones(1, len(row), dtype=torch.bool), m.n_sink)[0]
        expected = (margins[unit["name"]] >= m.threshold) | sinks
        assert [c != APPROXIMATE for c in row] == expected.tolist()


def test_mixture_of_depths_counts_in_capacity_mode():
    _, routed = tiny_routed("llama", RoutingPlan(variant="mod", n_sink=2))
    routed.records = {"training": {"sparsity": 0.5}}
    result = routing_heatmap(routed, PROMPT, None, held_in={})
    T = len(result["tokens"])
    assert result["mode"] == "capacity" and [u["kind"] for u in result["units"]] == ["layer", "layer"]
    for row in result["decisions"]:
        assert sum(c in (EXECUTE, SINK) for c in row) == -(-T // 2)  # ceil(c·T), sinks among them


def test_png_and_svg_are_valid_images(tmp_path):
    from PIL import Image

    _, routed = tiny_routed("llama")
    png, svg = tmp_path / "routing.png", tmp_path / "routing.SVG"
    result = routing_heatmap(routed, PROMPT, png, held_in={"layer0_attn": 0.25, "layer1_mlp": 1.0})
    assert result["path"] == str(png) and result["execute_fraction_source"] == "given"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    with Image.open(png) as image:
        width, height = image.size
        assert width > height > 200
    routing_heatmap(routed, PROMPT, svg, held_in={})
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = svg.read_text()
    assert "layer 1 mlp" in text and "approximate" in text  # text stays text (svg.fonttype none)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left behind


def test_execute_fractions_from_records_or_measured():
    _, routed = tiny_routed("llama")
    routed.records = {"evaluation": {"data": "wiki:heldout", "tokens": 2048,
                                     "sparsity": {"by_unit": {n: 0.25 for n in routed.units}}}}
    result = routing_heatmap(routed, PROMPT, None)
    assert [u["execute_fraction"] for u in result["units"]] == [0.75] * 4
    assert result["execute_fraction_source"].startswith("held-out, from the evaluation records (wiki:heldout")

    windows = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    result = routing_heatmap(routed, PROMPT, None, held_in=windows)
    assert result["execute_fraction_source"] == "measured on 3 given windows of 40 tokens"
    routed.reset_stats()
    routed.set_routing("threshold", record=True)
    with torch.no_grad():
        for w in windows:
            routed(w.unsqueeze(0))
    assert [u["execute_fraction"] for u in result["units"]] == pytest.approx(
        [u.executed / u.tokens for u in routed.units.values()])


def test_measured_on_the_converts_held_in_windows(tmp_path):
    """Without per-unit records: the last calibration windows of the data the convert trained on."""
    corpus = tmp_path / "train.txt"
    corpus.write_text(sample_text() * 10)
    _, routed = tiny_routed("llama")
    routed.records = {"training": {"config": {"data": str(corpus), "calib_windows": 2, "lff_seq_len": 32}}}
    result = routing_heatmap(routed, PROMPT, None)
    assert result["execute_fraction_source"] == f"held-in, measured on the last 2 windows of 32 tokens of {corpus}"
    assert all(0.0 < u["execute_fraction"] <= 1.0 for u in result["units"])


def test_folded_units_get_their_own_colour():
    """Folded units (``RoutedModel.folded``) are drawn as such; a stand-in keeps this test independent of them."""
    _, routed = tiny_routed("llama")

    class Folded:  # the routed model as seen with layer1_mlp folded to its forecaster
        def __init__(self, routed):
            self._routed = routed
            unit = routed.units["layer1_mlp"]
            unit.how = "forecast"
            self.folded = {"layer1_mlp": unit}
            self.units = {n: u for n, u in routed.units.items() if n != "layer1_mlp"}

        def __getattr__(self, name):
            return getattr(self._routed, name)

        def __call__(self, *args):
            return self._routed(*args)

    result = routing_heatmap(Folded(routed), PROMPT, None, held_in={"layer1_mlp": 0.0})
    unit, row = result["units"][-1], result["decisions"][-1]
    assert unit["name"] == "layer1_mlp" and unit["folded"] == "forecast"
    assert row[:2] == [SINK, SINK] and set(row[2:]) == {FOLDED} and unit["execute_fraction"] == 0.0


def test_real_folded_units(tmp_path):
    if not hasattr(irc.routing.RoutedModel, "fold"):
        pytest.skip("this irc has no folded units (RoutedModel.fold) yet")
    _, routed = tiny_routed("llama")
    routed.fold({"layer0_mlp": "forecast", "layer1_attn": "plain"})
    result = routing_heatmap(routed, PROMPT, tmp_path / "folded.png", held_in={})
    assert [u["name"] for u in result["units"]] == ["layer0_attn", "layer0_mlp", "layer1_attn", "layer1_mlp"]
    assert [u["folded"] for u in result["units"]] == [None, "forecast", "plain", None]
    T = len(result["tokens"])
    assert [u["executed"] for u in result["units"]][1:3] == [2, T]  # forecast: the sinks; plain: every token
    assert result["decisions"][1] == result["decisions"][2] == [SINK, SINK] + [FOLDED] * (T - 2)
    routed.reset_stats()
    routed.set_routing("threshold", record=True)
    with torch.no_grad():
        routed(torch.tensor([result["token_ids"]]))
    everything = {**routed.units, **routed.folded}
    assert [u["executed"] for u in result["units"]] == [everything[u["name"]].executed for u in result["units"]]


def test_bad_paths_are_user_errors(tmp_path):
    _, routed = tiny_routed("llama")
    with pytest.raises(UserError, match=r"writes \.png or \.svg files, got '.*routing\.jpg'"):
        routing_heatmap(routed, PROMPT, tmp_path / "routing.jpg")
    with pytest.raises(UserError, match="does not exist"):
        check_heatmap_path(tmp_path / "missing" / "routing.png")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="does not exist"):
        check_heatmap_path(tmp_path / "file" / "routing.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        check_heatmap_path(tmp_path / "dir.png")
    with pytest.raises(UserError, match="empty after tokenisation"):
        routing_heatmap(routed, "", None, held_in={})


@pytest.fixture(scope="module")
def routed_dir(tiny_dirs, tmp_path_factory):
    base = irc.load_model(str(tiny_dirs["llama"]), dtype="fp32")
    routed = irc.route(base, RoutingPlan(lff_rank=16, n_sink=2))
    randomize_routing(routed)
    routed.records = {"evaluation": {"data": "wiki:heldout", "tokens": 2048,
                                     "sparsity": {"by_unit": {n: 0.5 for n in routed.units}}}}
    return routed.save(tmp_path_factory.mktemp("routed") / "tiny-s50")


def test_cli_json_includes_the_matrix(routed_dir, tmp_path, capsys):
    png = tmp_path / "routing.png"
    assert main(["inspect", str(routed_dir), "--dtype", "fp32", "--prompt", PROMPT, "--heatmap", str(png),
                 "--json"]) == 0
    heat = json.loads(capsys.readouterr().out)["heatmap"]
    assert heat["path"] == str(png) and png.read_bytes().startswith(PNG_SIGNATURE)
    assert len(heat["decisions"]) == 4 and all(len(r) == len(heat["tokens"]) for r in heat["decisions"])
    assert heat["execute_fraction_source"].startswith("held-out")


def test_cli_human_output_names_the_file(routed_dir, tmp_path, capsys):
    svg = tmp_path / "routing.svg"
    assert main(["inspect", str(routed_dir), "--dtype", "fp32", "--prompt", PROMPT, "--heatmap", str(svg),
                 "--no-code"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"heatmap: wrote {svg} (4 units × ") for line in lines)
    assert lines[-1].startswith("PASSED inspect")


@pytest.mark.parametrize("args, message", [
    (["--heatmap", "x.png"], "--heatmap needs --prompt TEXT"),
    (["--prompt", "hi"], "--prompt is only used with --heatmap"),
    (["--prompt", "hi", "--heatmap", "x.jpg"], "--heatmap writes .png or .svg files"),
    (["--prompt", "hi", "--heatmap", "/no/such/dir/x.png"], "does not exist"),
])
def test_cli_bad_input_fails_before_loading(args, message, capsys):
    # the model does not exist: an error about it would mean it was looked at first
    assert main(["inspect", "/no/such/model", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_refuses_a_base_model(tiny_dirs, tmp_path, capsys):
    assert main(["inspect", str(tiny_dirs["llama"]), "--prompt", "hi", "--heatmap", str(tmp_path / "x.png")]) == 2
    assert "needs a routed model directory" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
