"""ONNX Runtime sessions for exported files, including the ``trt`` profile's plugin nodes.

A ``trt``-profile file holds ``TokenGather`` / ``TokenScatter`` nodes in the
``ai.onnx.contrib`` domain (``irc.ops.onnx_plugin``), which plain ONNX Runtime
rejects. onnxruntime-extensions runs such nodes as Python ops; here they are
the ops' own pure-torch references, so ONNX Runtime checks the rest of the
graph around exactly the semantics the TensorRT plugins implement. Python ops
are registered for fp32 tensors (onnxruntime-extensions binds one type list per
op name); that is the precision exports are verified in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from irc.errors import UserError
from irc.ops.onnx_plugin import DOMAIN

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from irc.ops.token_gather import token_gather_reference
    from irc.ops.token_scatter import token_scatter_reference

    attrs = {"plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string}
    f32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64

    @onnx_op(op_type="TokenGather", inputs=[f32, i64], outputs=[f32], attrs=attrs)
    def _token_gather(x, index, **_):
        return token_gather_reference(torch.from_numpy(x), torch.from_numpy(index)).numpy()

    @onnx_op(op_type="TokenScatter", inputs=[f32, f32, i64], outputs=[f32], attrs=attrs)
    def _token_scatter(base, src, index, **_):
        out = token_scatter_reference(torch.from_numpy(base), torch.from_numpy(src), torch.from_numpy(index))
        return np.ascontiguousarray(out.numpy())

    _REGISTERED = True


def custom_domains(path: str | Path) -> set[str]:
    """The non-standard operator domains ``path`` imports (reads the graph, not the weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")}


def inference_session(path: str | Path, providers: list[str] | None = None):
    """An ``onnxruntime.InferenceSession`` for ``path``, with the plugin nodes' Python ops when it has any."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    domains = custom_domains(path)
    if DOMAIN in domains:
        try:
            from onnxruntime_extensions import get_library_path
        except ImportError:
            raise UserError(f"{path} has TensorRT plugin nodes ({DOMAIN}); running it in ONNX Runtime needs "
                            "onnxruntime-extensions: pip install 'onnxruntime-extensions>=0.15'") from None
        _register()
        options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
