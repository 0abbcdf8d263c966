"""Exporters of routed models: pt2, ONNX, TensorRT (TensorRT imports stay lazy)."""
