"""A decoder whose unit structure the pass does not know is refused in one line (issue #13).

The structure: each layer adds its attention output to the stream twice, once
directly and once through a side branch (``x + h + 0.5·h``). The unit's output
then has two readers, which no known structure has: the pass names the layer
and the node, and the CLI prints that one line and exits 2.
"""

import pytest
from transformers.models.llama import modeling_llama

import irc
from irc.cli import main
from irc.errors import UserError
from irc.plan import RoutingPlan

from tiny import save_tiny


def _side_branch_forward(self, hidden_states, attention_mask=None, position_ids=None,
                         position_embeddings=None, **kwargs):
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                          position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + h
    hidden_states = hidden_states + h * 0.5  # a second residual add of the same unit
    residual = hidden_states
    h = self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + h


@pytest.fixture
def side_branch(monkeypatch):
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", _side_branch_forward)


def test_unknown_structure_names_the_layer_and_node(side_branch):
    from routed_helpers import tiny_loaded

    loaded = tiny_loaded("llama")
    with pytest.raises(UserError) as e:
        irc.route(loaded, RoutingPlan())
    message = str(e.value)
    assert "\n" not in message
    assert "layer 0 (m.model.layers.0), node add_" in message
    assert "has uses besides the residual add" in message


def test_cli_exits_2_with_one_line(side_branch, tmp_path, capsys):
    directory = save_tiny("llama", tmp_path / "llama")
    capsys.readouterr()  # the save's progress bars
    assert main(["inspect", str(directory), "--dtype", "fp32", "--no-code"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "layer 0" in err[0], err


def test_a_misread_structure_fails_the_dense_probe(monkeypatch):
    # simulate a pass that outlines a unit wrongly: the probe at load time refuses the model
    from routed_helpers import tiny_loaded

    from irc.nn.routed_unit import RoutedUnit

    forward = RoutedUnit.forward

    def wrong(self, x, attention_mask, *extras):
        return forward(self, x, attention_mask, *extras) * 1.5

    monkeypatch.setattr(RoutedUnit, "forward", wrong)
    with pytest.raises(UserError, match="does not reproduce the base model with every unit executing"):
        irc.route(tiny_loaded("qwen2"), RoutingPlan())
