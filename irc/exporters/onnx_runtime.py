"""Running an exported ``.onnx`` file with ONNX Runtime, as a logits callable.

``OnnxModel(path)(input_ids)`` returns logits like a PyTorch model does, so
``evaluate_perplexity`` measures a deployed file with the very code that
measured the PyTorch model. The manifest beside the file (``model.onnx.json``)
says where the base model (and so the tokenizer) came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from irc.errors import UserError


class OnnxModel:
    def __init__(self, path: str | Path, providers: list[str] | None = None):
        from irc.exporters.onnx_contrib import inference_session

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no such ONNX file: {self.path}")
        manifest = self.path.with_name(self.path.name + ".json")
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        try:
            self.session = inference_session(self.path, providers)
        except UserError:
            raise
        except Exception as e:  # ORT raises its own exception types for unreadable files
            raise UserError(f"ONNX Runtime cannot load {self.path}: {e}") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}
        logits = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})[0]
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def tokenizer(self):
        from irc.models import load_tokenizer

        source = self.manifest.get("base", {}).get("source")
        if not source:
            raise UserError(f"{self.path} has no manifest naming its base model; cannot pick a tokenizer")
        return load_tokenizer(source)
