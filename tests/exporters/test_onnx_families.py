"""ONNX export of one family per unit structure (issue #13), verified with ONNX Runtime.

One export per structure the routing pass learns beyond the pre-norm decoders
(each export takes seconds, so one each): a post-norm without a pre-norm
(olmo2), a residual scale (granite), a parallel residual with a fused q/k/v
projection (gpt_neox), a mixture of experts (mixtral, whose grouped expert
product has its own lowering, ``irc.exporters.onnx_moe``). Both profiles are
covered: the ``trt`` one also passes the TensorRT lint.
"""

import numpy as np
import onnx
import pytest
import torch
from routed_helpers import tiny_routed

from irc.exporters.onnx import OnnxExportConfig, export_onnx

KINDS = [  # (family, profile)
    ("olmo2", "portable"),
    ("granite", "trt"),
    ("gpt_neox", "trt"),
    ("mixtral", "portable"),
]


@pytest.mark.parametrize("family,profile", KINDS)
def test_family_exports_and_runs(family, profile, tmp_path):
    from irc.exporters.onnx_contrib import inference_session

    _, routed = tiny_routed(family)
    out = tmp_path / "model.onnx"
    manifest = export_onnx(routed, out, OnnxExportConfig(routing="threshold", profile=profile), log=lambda s: None)
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_diff"] < 1e-4
    if profile == "trt":
        assert manifest["trt_lint"]["passed"]
    ops = {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    assert "NonZero" in ops  # threshold routing: data-dependent token counts
    # a batch and a length the export never saw, left padding in one row
    session = inference_session(out)
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    routed.set_routing("threshold")
    routed.reset_stats()
    with torch.no_grad():
        want = routed(ids, mask).numpy()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - want)[mask.bool().numpy()].max() < 1e-4
    fractions = [u.execute_fraction for u in routed.units.values()]
    assert 0 < min(fractions) and max(fractions) < 1  # routing really split the tokens
