"""onnxruntime, as the agent uses it: located (not imported) by onnxruntime-genai, which loads the
C library itself (added by hook-onnxruntime_genai.py). So only the package goes in, for
``find_spec``; its Python API stays out: the 36 MB pybind11 module and the tools behind it.
Overrides the community hook, which collects all of that.
"""

excludedimports = ["onnxruntime.capi", "onnxruntime.tools", "onnxruntime.transformers",
                   "onnxruntime.quantization", "onnxruntime.backend", "onnxruntime.datasets"]
