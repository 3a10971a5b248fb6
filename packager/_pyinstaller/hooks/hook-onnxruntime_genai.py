"""onnxruntime-genai: its extension and ``libonnxruntime-genai.so`` (PyInstaller follows the
extension's dependency), plus what it looks for at run time: the ``onnxruntime`` package, located
with ``importlib.util.find_spec`` (never imported), and ``capi/libonnxruntime.so.<version>``,
which it ctypes-loads by a glob there (the community hook misses the versioned file).
"""

from glob import glob

from PyInstaller.utils.hooks import copy_metadata, get_package_paths

_, _ort = get_package_paths("onnxruntime")

hiddenimports = ["onnxruntime"]
binaries = [(p, "onnxruntime/capi") for p in sorted(glob(f"{_ort}/capi/libonnxruntime.so*"))
            + sorted(glob(f"{_ort}/capi/libonnxruntime_providers_shared.so"))]
datas = copy_metadata("onnxruntime-genai")  # the probe reads the version from its dist-info
# The model builder (torch, transformers, onnx) is the packager's, not the device's.
excludedimports = ["onnxruntime_genai.models"]
