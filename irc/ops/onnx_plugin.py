"""Custom-domain ONNX nodes for the ``trt`` profile: how an irc op becomes a TensorRT plugin node.

TensorRT's ONNX parser maps a node it does not know to a plugin by ``op_type``
(the plugin's name) and the ``plugin_namespace`` / ``plugin_version`` string
attributes; it ignores the domain. The domain is ``ai.onnx.contrib``, the one
onnxruntime-extensions serves Python ops from, so the same file also runs in
ONNX Runtime (``irc.exporters.onnx_contrib``) for verification.

onnxscript only builds nodes whose schema ``onnx.defs`` knows, so each op
registers one (once per process) before its lowering runs.
"""

from __future__ import annotations

DOMAIN = "ai.onnx.contrib"
PLUGIN_NAMESPACE = "irc"
PLUGIN_VERSION = "1"
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def plugin_opset(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], doc: str):
    """The onnxscript opset that builds ``name`` nodes; ``inputs``/``outputs`` are (name, type) pairs,
    type ``"T"`` for the float token rows or an ONNX type string."""
    import onnx
    from onnx.defs import OpSchema
    from onnxscript import values

    if not onnx.defs.has(name, DOMAIN):
        schema = OpSchema(
            name, DOMAIN, 1, doc=doc,
            inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
            outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
            type_constraints=[("T", FLOAT_TYPES, "token rows")],
            attributes=[
                OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
            ],
        )
        onnx.defs.register_schema(schema)
    return values.Opset(DOMAIN, 1)


def plugin_attributes() -> dict[str, str]:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
