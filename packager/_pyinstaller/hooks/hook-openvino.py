"""OpenVINO, which has no PyInstaller hook: its runtime libraries, collected where they were.

``libopenvino`` finds its plugins (CPU, GPU, NPU, AUTO, HETERO, BATCH) and frontends by file name
in its own folder, so ``openvino/libs`` keeps its layout. Only the IR frontend goes in: bundles
carry IR, so the ONNX, PaddlePaddle, PyTorch, TensorFlow (Lite), JAX and GGUF frontends (21 MB)
and the C API stay out, and so do the converters' Python packages.
"""

from pathlib import Path

from PyInstaller.utils.hooks import copy_metadata, get_package_paths

_, _pkg = get_package_paths("openvino")
_libs = Path(_pkg) / "libs"
_LEFT_OUT = ("_frontend.so", "libopenvino_c.so")

binaries = [(str(p), "openvino/libs") for p in sorted(_libs.glob("*.so*"))
            if not any(x in p.name for x in _LEFT_OUT) or "libopenvino_ir_frontend" in p.name]
datas = [(str(_libs / "cache.json"), "openvino/libs"), *copy_metadata("openvino")]
excludedimports = ["openvino.tools", "openvino.torch", "openvino.frontend.pytorch",
                   "openvino.frontend.tensorflow", "openvino.frontend.jax", "openvino.frontend.onnx",
                   "openvino.frontend.paddle", "torch", "tensorflow", "jax", "paddle", "onnx"]
