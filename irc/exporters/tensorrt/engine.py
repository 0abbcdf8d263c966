"""Run a serialized TensorRT engine on torch CUDA tensors, as a logits callable.

``Engine(path)(input_ids, attention_mask)`` returns logits like ``OnnxModel`` and the
PyTorch model do, so ``evaluate_perplexity`` (and ``irc run`` / ``irc bench``) measure a
deployed engine with the same code. Inputs may live on the CPU; they are copied to the
GPU. Outputs come through an ``IOutputAllocator``, so data-dependent output shapes
(``threshold`` routing) work too; the logits come back as float32 on the device the
``input_ids`` were on (CPU ids: CPU logits, as ``OnnxModel`` returns).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from irc.errors import UserError
from irc.exporters.tensorrt import _import_tensorrt, _require_cuda

__all__ = ["Engine"]


def _torch_dtype(trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    if dtype not in table:
        raise UserError(f"engine tensor type {dtype} is not one irc engines use")
    return table[dtype]


def _output_allocator(trt):
    class TorchOutputAllocator(trt.IOutputAllocator):
        """Hands TensorRT torch-owned device buffers; keeps each one and its final shape."""

        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple] = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self._allocate(tensor_name, size)

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self._allocate(tensor_name, size)

        def _allocate(self, name: str, size: int) -> int:
            buf = self.buffers.get(name)
            if buf is None or buf.numel() < size:
                # rounded up to 16 bytes so the buffer views as any element type
                buf = torch.empty(max(-(-int(size) // 16) * 16, 16), dtype=torch.uint8, device="cuda")
                self.buffers[name] = buf
            return buf.data_ptr()

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return TorchOutputAllocator()


class Engine:
    """A deserialized engine, its manifest (``model.engine.json``) and one execution context."""

    def __init__(self, path: str | Path):
        trt = _import_tensorrt()
        _require_cuda()
        from irc.exporters.tensorrt.plugins import register_plugins

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no such engine file: {self.path}")
        manifest = self.path.with_name(self.path.name + ".json")
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        register_plugins()  # JIT-built engines call back into Python; AOT ones do not need it
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT cannot load {self.path} (built by another TensorRT version or for "
                            "another GPU?); rebuild it with irc export trt")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self._allocator = _output_allocator(trt)
        for name in self.outputs:
            self.context.set_output_allocator(name, self._allocator)

    def profile_range(self, name: str) -> tuple[tuple, tuple, tuple]:
        """(min, opt, max) shapes of input ``name`` in the engine's optimization profile 0."""
        return tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        stream = torch.cuda.current_stream()
        keep = []  # device copies must outlive the launch
        for name in self.inputs:
            if name not in feeds:
                raise UserError(f"{self.path} wants an input {name!r}; irc engines take input_ids and attention_mask")
            lo, _, hi = self.profile_range(name)
            shape = tuple(feeds[name].shape)
            if any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                raise UserError(f"input {name} of shape {shape} is outside the engine's profile {lo}..{hi}; "
                                "rebuild with a wider --max-seq / --max-batch")
            dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            t = feeds[name].to(device="cuda", dtype=dtype).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path}")
        stream.synchronize()
        name = self.outputs[0]
        shape = self._allocator.shapes[name]
        dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
        numel = int(torch.tensor(shape).prod()) if shape else 1
        flat = self._allocator.buffers[name].view(dtype)[:numel]
        # a float32 copy on the inputs' device (like OnnxModel): the buffer is reused by the next call
        return flat.view(shape).to(device=input_ids.device, dtype=torch.float32, copy=True)

    def tokenizer(self):
        from irc.models import load_tokenizer

        source = self.manifest.get("base", {}).get("source")
        if not source:
            raise UserError(f"{self.path} has no manifest naming its base model; cannot pick a tokenizer")
        return load_tokenizer(source)
