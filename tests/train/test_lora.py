"""The LoRA stage: neutral when attached, lowers the loss when trained, saved and loaded."""

import json

import pytest
import torch
from routed_helpers import batch, tiny_routed

import irc
from irc.plan import RoutingPlan
from irc.train.lora_train import LoRATrainConfig, train_lora
from irc.train.losses import lm_loss

from tiny import save_tiny


def test_attached_lora_changes_nothing_and_shares_weights():
    _, plain = tiny_routed("qwen3", RoutingPlan(lff_rank=16, n_sink=2))
    _, lora = tiny_routed("qwen3", RoutingPlan(lff_rank=16, n_sink=2, lora_rank=4))
    ids, mask = batch(16)
    for r in (plain, lora):
        r.set_routing("threshold")
    with torch.no_grad():
        assert torch.equal(plain(ids, mask), lora(ids, mask))
    unit = lora.units["layer0_attn"]
    # the body and the query path adapt q_proj with one shared delta
    assert unit.body.q_proj.parametrizations.weight[0] is unit.query.q_proj.parametrizations.weight[0]
    assert set(unit.lora) == {"q_proj", "v_proj"} and set(lora.units["layer0_mlp"].lora) == {"gate_proj"}


def test_lora_training_lowers_the_loss():
    torch.manual_seed(0)
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2, lora_rank=8))
    windows = torch.randint(3, 40, (8, 32))  # a small vocabulary: learnable
    result = train_lora(routed, windows, LoRATrainConfig(steps=40, batch_size=4, lr=1e-2), show_progress=False)
    assert result["last_loss"] < 0.9 * result["first_loss"]
    assert routed.units["layer0_attn"].lora["q_proj"].B.abs().sum() > 0


def test_lora_round_trips(tmp_path):
    base = save_tiny("llama", tmp_path / "base")
    routed = irc.route(irc.load_model(str(base), dtype="fp32"), RoutingPlan(lff_rank=8, n_sink=2, lora_rank=4))
    with torch.no_grad():
        for u in routed.units.values():
            for d in u.lora.values():
                d.B.normal_(0, 0.05)
    ids, mask = batch(12)
    routed.set_routing("dense")
    with torch.no_grad():
        want = routed(ids, mask)
    out = routed.save(tmp_path / "r")
    assert json.loads((out / "irc.json").read_text())["plan"]["lora_rank"] == 4
    again = irc.load(out)
    again.set_routing("dense")
    with torch.no_grad():
        assert torch.equal(again(ids, mask)[mask.bool()], want[mask.bool()])


def test_no_lora_is_an_error():
    _, routed = tiny_routed("llama")
    with pytest.raises(ValueError, match="has no LoRA"):
        train_lora(routed, torch.randint(3, 40, (2, 8)), LoRATrainConfig(steps=1))


def test_dense_lora_trains_with_every_unit_executing():
    torch.manual_seed(0)
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2, lora_rank=8))
    windows = torch.randint(3, 40, (8, 32))
    result = train_lora(routed, windows, LoRATrainConfig(steps=30, batch_size=4, lr=1e-2, routing="dense"),
                        show_progress=False)
    assert result["last_loss"] < 0.9 * result["first_loss"]
    with pytest.raises(ValueError, match="routing must be"):
        LoRATrainConfig(routing="gumbel")


def test_threshold_lora_adapts_only_what_inference_runs():
    """With the calibrated decisions, a unit that never executes gets no LoRA gradient (its
    forecast reads the unadapted input norm only); units that execute do adapt."""
    torch.manual_seed(0)
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=0, lora_rank=8))
    never = routed.units["layer1_mlp"]
    with torch.no_grad():
        for unit in routed.units.values():
            unit.threshold.fill_(-1e9)  # execute every token
        never.threshold.fill_(1e9)  # approximate every token
    windows = torch.randint(3, 40, (8, 32))
    result = train_lora(routed, windows, LoRATrainConfig(steps=20, batch_size=4, lr=1e-2, routing="threshold"),
                        show_progress=False)
    assert result["last_loss"] < 0.9 * result["first_loss"]
    assert never.lora["gate_proj"].B.abs().sum() == 0
    assert routed.units["layer0_mlp"].lora["gate_proj"].B.abs().sum() > 0


def test_sparse_threshold_gradients_equal_the_blend():
    """LoRA trains through the sparse path (gather/scatter autograd): the same gradients as
    computing every unit densely and blending by the decisions."""
    torch.manual_seed(0)
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2, lora_rank=4))
    params = [p for u in routed.units.values() for p in u.lora.parameters()]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    for p in routed.gm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    ids, mask = batch(24)
    grads, fractions = {}, {}
    for sparse in (False, True):
        routed.set_routing("threshold", sparse=sparse, record=True)
        routed.reset_stats()
        for p in params:
            p.grad = None
        lm_loss(routed(ids, mask), ids, mask).backward()
        grads[sparse] = torch.cat([p.grad.flatten() for p in params])
        fractions[sparse] = routed.execute_fractions()
    assert fractions[True] == fractions[False] and 0.05 < min(fractions[True].values()) < 0.95
    assert grads[False].abs().max() > 0
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-5)


def test_distill_loss_is_the_kl_divergence():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    from irc.train.lora_train import distill_loss

    real = mask.bool()
    want = torch.nn.functional.kl_div(torch.log_softmax(student[real], -1), torch.log_softmax(teacher[real], -1),
                                      log_target=True, reduction="batchmean")
    assert torch.allclose(distill_loss(student, teacher, mask), want, atol=1e-6)
    assert distill_loss(teacher, teacher, mask).abs() < 1e-6


def test_distillation_pulls_the_routed_model_toward_its_teacher():
    from irc.train.lora_train import distill_loss

    torch.manual_seed(0)
    base, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2, lora_rank=8))
    with torch.no_grad():
        for name, unit in routed.units.items():  # MLPs forecast only: far from the teacher
            unit.threshold.fill_(1e9 if name.endswith("mlp") else -1e9)
    windows = torch.randint(3, 300, (8, 32))

    def teacher(ids):
        return base.model(ids).logits

    def gap():
        routed.set_routing("threshold", sparse=False, record=False)
        with torch.no_grad():
            ones = torch.ones_like(windows)
            return float(distill_loss(routed(windows, ones), teacher(windows), ones))

    before = gap()
    with pytest.raises(ValueError, match="needs a teacher"):
        train_lora(routed, windows, LoRATrainConfig(steps=1, distill=1.0), show_progress=False)
    train_lora(routed, windows, LoRATrainConfig(steps=30, batch_size=4, lr=1e-2, routing="threshold", distill=1.0),
               teacher=teacher, show_progress=False)
    assert gap() < 0.8 * before


def test_generation_with_lora_matches_prefill():
    """``generate`` caches the LoRA parametrizations for the whole loop: the logits are unchanged."""
    from irc.generation import GenerationConfig, generate

    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2, lora_rank=4))
    with torch.no_grad():
        for u in routed.units.values():
            for d in u.lora.values():
                d.B.normal_(0, 0.05)
    routed.set_routing("dense")
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    result = generate(routed, ids, config=GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    full = torch.cat([ids, torch.tensor([result.tokens[0][:-1]])], dim=1)
    with torch.no_grad():
        logits = routed(full, torch.ones_like(full))
    assert logits[0, ids.shape[1] - 1:].argmax(-1).tolist() == result.tokens[0]
