"""Any model irc handles, opened as a logits callable with its tokenizer.

``open_model(spec)`` takes what the CLI takes: an exported ``.onnx`` file (ONNX
Runtime), a ``.engine`` file (TensorRT), a routed model directory (PyTorch,
threshold routing: the calibrated per-token decisions), or a base model (an HF
directory, a ``.gguf`` file, ``smollm2-135m``). ``irc run`` and ``irc bench``
drive all of them through the same ``(input_ids, attention_mask) -> logits``
call that ``evaluate_perplexity`` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass
class OpenedModel:
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [B, T] ids, mask -> [B, T, V] logits
    tokenizer: object
    backend: str
    description: str
    routed: object | None = None  # the RoutedModel, for the torch backend of a routed directory

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.forward(input_ids, attention_mask)


def open_model(spec: str, *, dtype: str = "bf16", routing: str = "threshold") -> OpenedModel:
    import irc
    from irc.routing import is_routed_dir

    if spec.endswith(".onnx"):
        from irc.exporters.onnx_runtime import OnnxModel

        model = OnnxModel(spec)
        m = model.manifest
        what = f"{m.get('routing', '?')} routing, {m.get('profile', '?')} profile" if m else "no manifest"
        return OpenedModel(model, model.tokenizer(), "onnxruntime", f"{spec} ({what})")
    if spec.endswith(".engine"):
        from irc.exporters.tensorrt import Engine

        engine = Engine(spec)
        return OpenedModel(engine, engine.tokenizer(), "tensorrt", spec)
    if is_routed_dir(spec):
        routed = irc.load(spec, dtype=dtype)
        routed.set_routing(routing)
        sparsity = routed.records.get("training", {}).get("sparsity")
        trained = f", trained for sparsity {sparsity}" if sparsity is not None else ""
        return OpenedModel(routed, routed.base.tokenizer, "torch",
                           f"{spec} ({routed.plan.variant}, {routing} routing{trained}, {dtype})", routed)
    loaded = irc.load_model(spec, dtype=dtype)

    def forward(ids, mask):
        return loaded.model(input_ids=ids, attention_mask=mask).logits

    return OpenedModel(forward, loaded.tokenizer, "torch", loaded.describe())
