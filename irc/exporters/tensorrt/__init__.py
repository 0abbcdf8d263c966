"""TensorRT engines of routed models, with ``irc::token_gather`` / ``token_scatter`` as plugins.

Nothing here imports ``tensorrt`` at module import time: ``import irc.exporters.tensorrt``
works on any machine, and every entry point that needs TensorRT (``build_engine``,
``Engine``, ``register_plugins``) calls ``_import_tensorrt()`` first, which turns a
missing install into one ``UserError`` line saying what to install.

- ``shapes``   plain-Python shape rules of the plugins (mirror the ops' ``register_fake``)
- ``kernels``  the ops' Triton kernels in the argument order TensorRT's AOT launch uses
- ``plugins``  ``tensorrt.plugin`` registrations ``irc::TokenGather`` / ``irc::TokenScatter``
- ``builder``  ONNX → serialized engine + manifest
- ``engine``   ``Engine``: run a serialized engine on torch CUDA tensors
"""

from __future__ import annotations

from irc.errors import UserError

__all__ = ["INSTALL_HINT", "Engine", "EngineBuildConfig", "build_engine", "register_plugins"]

INSTALL_HINT = (
    "TensorRT needs the `trt` extra and an NVIDIA GPU: on a machine with a CUDA GPU, "
    "pip install 'irc[trt]' --extra-index-url https://pypi.nvidia.com"
)


def _import_tensorrt():
    """Return the ``tensorrt`` module, or raise ``UserError`` with the one-line install hint."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but its CUDA libraries are not
        raise UserError(f"{INSTALL_HINT} (import tensorrt failed: {e})") from None
    return tensorrt


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{INSTALL_HINT} (no CUDA device is visible to torch)")


def __getattr__(name: str):
    if name == "Engine":
        from irc.exporters.tensorrt.engine import Engine

        return Engine
    if name in ("build_engine", "EngineBuildConfig"):
        from irc.exporters.tensorrt import builder

        return getattr(builder, name)
    if name == "register_plugins":
        from irc.exporters.tensorrt.plugins import register_plugins

        return register_plugins
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
