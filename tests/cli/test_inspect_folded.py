"""``irc inspect`` on a folded routed directory: folded units shown as such, with the evidence."""

import json

import irc
from irc.cli import main
from irc.plan import RoutingPlan

from tiny import save_tiny


def test_inspect_shows_folded_units(tmp_path, capsys):
    base = save_tiny("llama", tmp_path / "base")
    routed = irc.route(irc.load_model(str(base), dtype="fp32"), RoutingPlan(lff_rank=8, n_sink=2))
    routed.fold({"layer0_attn": "forecast", "layer1_mlp": "plain"})
    routed.records = {"fold": {"epsilon": 0.05, "held_in_execute": {"layer0_attn": 0.012, "layer1_mlp": 0.991,
                                                                    "layer0_mlp": 0.5, "layer1_attn": 0.3}}}
    out = routed.save(tmp_path / "routed")
    dot = tmp_path / "unit.dot"
    assert main(["inspect", str(out), "--dtype", "fp32", "--layer", "0", "--unit", "attn", "--dot", str(dot)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    rows = {tuple(line.split()[:2]): line for line in lines if line.strip().startswith(("0  ", "1  "))}
    assert "folded: forecast" in rows[("0", "attn")] and "0.012" in rows[("0", "attn")]
    assert "folded: plain" in rows[("1", "mlp")] and "0.991" in rows[("1", "mlp")]
    assert " yes " in rows[("0", "mlp")] and " yes " in rows[("1", "attn")]
    header = next(line for line in lines if line.startswith("layer  unit"))
    end = header.index("router") + len("router")  # the router column, right-aligned, 9 wide
    router = {key: line[end - 9:end].strip() for key, line in rows.items()}
    assert router[("0", "attn")] == router[("1", "mlp")] == ""
    assert router[("0", "mlp")] and router[("1", "attn")]
    assert "2 routed units, 2 folded (no router)" in text
    assert "# --- layer0_attn.kv ---" in text and "# --- layer0_attn.body ---" not in text
    drawing = dot.read_text()
    assert "folded: the first 2 real tokens execute" in drawing and "router:" not in drawing
    assert main(["inspect", str(out), "--dtype", "fp32", "--json", "--layer", "1", "--unit", "mlp",
                 "--dot", str(tmp_path / "plain.svg")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folded_units"] == {"layer0_attn": "forecast", "layer1_mlp": "plain"}
    units = {u["name"]: u for u in result["units"]}
    assert units["layer0_attn"]["folded"] == "forecast" and units["layer0_attn"]["router_params"] == 0
    assert result["routed_units"] == 2
