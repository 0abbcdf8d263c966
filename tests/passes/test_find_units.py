import pytest
import torch

from irc.capture import capture
from irc.errors import UserError
from irc.passes.drop_noop_conversions import drop_noop_conversions
from irc.passes.find_units import find_units

from tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finds_every_unit(family, dtype):
    gm = capture(tiny_model(family).to(dtype)).gm
    drop_noop_conversions(gm)
    units = find_units(gm)
    assert [(u.layer, u.kind) for u in units] == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    for u in units:
        assert u.path.endswith(".self_attn" if u.kind == "attn" else ".mlp")
        assert u.norm_path.endswith(".input_layernorm" if u.kind == "attn" else ".post_attention_layernorm")
        assert u.add.args[:2] in ((u.residual, u.output), (u.output, u.residual))
    # the MLP's residual is the attention's residual add
    assert units[1].residual is units[0].add


def test_fp32_graph_needs_the_noop_cleanup():
    gm = capture(tiny_model("llama")).gm
    with pytest.raises(UserError, match=r"layer 0 \(m.model.layers.0\), node add_7: the term to_7 is a norm of the stream"):
        find_units(gm)


def test_a_leaking_node_is_named():
    gm = capture(tiny_model("llama")).gm
    drop_noop_conversions(gm)
    q_proj = next(n for n in gm.graph.nodes if n.op == "call_function" and "q_proj" in str(n.meta.get("nn_module_stack", "")))
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out):
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (q_proj,))
    out.args = ((out.args[0], extra),) if not isinstance(out.args[0], tuple) else (out.args[0] + (extra,),)
    with pytest.raises(UserError, match=r"layer 0 .*node linear of m.model.layers.0.self_attn.q_proj is used outside its module"):
        find_units(gm)


def test_a_graph_without_layers():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x * 2

    ep = torch.export.export(Plain(), (torch.ones(2),))
    with pytest.raises(UserError, match="found no decoder layers"):
        find_units(ep.module())
