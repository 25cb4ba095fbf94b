"""Inference backends for the frozen backbone passes (embeddings, cached maps): a registry of compilers.

A backend turns an ``nn.Module`` (images -> features) into a function on CPU float32 batches. ``torch``
runs it eagerly in ``torch.inference_mode`` with channels-last memory (optionally under bfloat16
autocast); ``onnxruntime`` and ``openvino`` run the graph exported once with ``torch.onnx``. The
exported backends are an optional extra (``pip install "multimodal_lesion[fast]"``), imported lazily;
their outputs agree with eager float32 to about 1e-5 (tests check 1e-3). ``auto`` (the default of
``train.embed_backend``) is not a backend but a choice among them, made once by :func:`resolve_backend`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn

from ..errors import ConfigError

#: A compiled pass: float32 NCHW batch on the CPU -> float32 features.
Compiled = Callable[[Tensor], Tensor]
Compiler = Callable[[nn.Module, Tensor, str], Compiled]
INSTALL_FAST = 'pip install "multimodal_lesion[fast]"'
_PACKAGES: Mapping[str, str] = MappingProxyType({"onnxruntime": "onnxruntime", "openvino": "openvino"})
_AUTOCAST: Mapping[str, torch.dtype] = MappingProxyType({"bfloat16": torch.bfloat16})


def _torch(module: nn.Module, example: Tensor, precision: str) -> Compiled:
    """Eager torch: inference mode, channels-last weights and inputs, bfloat16 autocast when asked."""
    module.eval().to(memory_format=torch.channels_last)
    dtype = _AUTOCAST.get(precision)

    def run(x: Tensor) -> Tensor:
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return module(x.contiguous(memory_format=torch.channels_last)).float()

    return run


def export_onnx(module: nn.Module, example: Tensor, path: Path) -> Path:
    """Trace ``module`` on ``example`` into an ONNX file with a dynamic batch axis."""
    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def _onnxruntime(module: nn.Module, example: Tensor, precision: str) -> Compiled:
    """ONNX Runtime's CPU provider on the exported graph, with torch's intra-op thread count."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mmlesion-onnx-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        path = export_onnx(module, example, Path(tmp) / "model.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _openvino(module: nn.Module, example: Tensor, precision: str) -> Compiled:
    """OpenVINO's CPU plugin on the exported graph, float32 inference, torch's thread count."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="mmlesion-onnx-") as tmp:
        path = export_onnx(module, example, Path(tmp) / "model.onnx")
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    return lambda x: torch.from_numpy(compiled(x.numpy())[0].copy())


#: Backend name -> compiler; ``train.embed_backend`` names one.
BACKENDS: Mapping[str, Compiler] = MappingProxyType(
    {"torch": _torch, "onnxruntime": _onnxruntime, "openvino": _openvino}
)


def backend_available(name: str) -> bool:
    """True when backend ``name``'s package is installed (``torch`` always is)."""
    package = _PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package) is not None


#: What ``auto`` picks on the CPU, fastest first (docs/performance.md): the first whose package imports.
AUTO_ORDER = ("openvino", "onnxruntime")


def _imports(package: str) -> bool:
    """True when ``package`` imports here (installed and not broken)."""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, precision: str = "float32", device: torch.device | None = None) -> str:
    """The concrete backend ``backend`` names: itself, or for ``auto`` the fastest that runs here.

    ``auto`` is the first of :data:`AUTO_ORDER` whose package imports, on the CPU and in float32 only;
    ``torch`` on a GPU, with a ``precision`` other than float32 (bfloat16 autocast is torch's) or when
    neither exported backend is installed.
    """
    if backend != "auto":
        return backend
    if precision != "float32" or (device is not None and device.type != "cpu"):
        return "torch"
    return next((name for name in AUTO_ORDER if _imports(_PACKAGES[name])), "torch")


def compile_pass(module: nn.Module, example: Tensor, backend: str = "torch", precision: str = "float32") -> Compiled:
    """``module`` compiled by ``backend``; an unknown or uninstalled backend is a one-line ConfigError.

    Args:
        module: images (N, 3, H, W) -> features; exported as traced on ``example`` (CPU, float32).
        example: a small input batch of the real shape.
        backend: a key of :data:`BACKENDS`.
        precision: ``float32``, or ``bfloat16`` autocast (``torch`` only).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"train.embed_backend: unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
    if not backend_available(backend):
        raise ConfigError(f"train.embed_backend={backend!r} needs the package '{_PACKAGES[backend]}': {INSTALL_FAST}")
    if precision != "float32" and backend != "torch":
        raise ConfigError(f"train.embed_precision={precision!r} is only available with train.embed_backend='torch'")
    return BACKENDS[backend](module, example, precision)


class BranchPass(nn.Module):
    """A method of the image branch (``embed`` or ``forward_maps``) as a module's forward, for export."""

    def __init__(self, branch: nn.Module, method: str) -> None:
        super().__init__()
        self.branch, self.method = branch, method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.branch, self.method)(x)


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "INSTALL_FAST",
    "BranchPass",
    "Compiled",
    "backend_available",
    "compile_pass",
    "export_onnx",
    "resolve_backend",
]
