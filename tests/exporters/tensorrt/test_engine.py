"""A real engine for a tiny routed model (needs TensorRT and an NVIDIA GPU: the ``trt`` marker).

Never run where irc is developed (TensorRT is not installable there); it is what a user
with the ``trt`` extra runs to check the whole path: export (--profile trt), lint, build
with the AOT plugins, run, compare with PyTorch.
"""

import pytest
import torch
from routed_helpers import tiny_routed

# fp32 engine vs PyTorch fp32 on a 2-layer hidden-64 model: kernels differ in
# accumulation order (cuBLAS/TensorRT tactics vs CPU); the ONNX export's FP32_ATOL.
ENGINE_ATOL = 5e-3


@pytest.mark.trt
@pytest.mark.parametrize("prefer_aot", [True, False], ids=["aot", "jit"])
def test_engine_matches_pytorch(prefer_aot, tmp_path):
    from irc.exporters.onnx import OnnxExportConfig, export_onnx
    from irc.exporters.tensorrt import Engine, EngineBuildConfig, build_engine

    _, routed = tiny_routed("llama")
    onnx_path = tmp_path / "model.onnx"
    export_onnx(routed, onnx_path, OnnxExportConfig(capacity=0.5, profile="trt", max_seq=256), log=print)
    engine_path = tmp_path / "model.engine"
    manifest = build_engine(onnx_path, engine_path, EngineBuildConfig(opt_seq=64, max_seq=256, max_batch=4,
                                                                      prefer_aot=prefer_aot), log=print)
    assert manifest["plugins"]["implementation"] == ("aot" if prefer_aot else "jit")
    engine = Engine(engine_path)
    routed.set_routing("capacity", capacity=0.5)
    for B, T, pad in ((1, 7, 0), (3, 33, 4), (2, 256, 0)):
        ids = torch.randint(0, 300, (B, T))
        mask = torch.ones_like(ids)
        mask[-1, :pad] = 0
        with torch.no_grad():
            want = routed(ids, mask).float()
        got = engine(ids, mask)
        assert got.device == ids.device and got.shape == want.shape
        assert (got - want)[mask.bool()].abs().max() <= ENGINE_ATOL
