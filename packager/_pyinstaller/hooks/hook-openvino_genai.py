"""openvino-genai: its extension and ``libopenvino_genai`` (followed as dependencies), and the
tokenizers extension. ``py_openvino_genai`` imports the ``openvino_tokenizers`` package to read
the extension's path (``_ext_path``: ``openvino_tokenizers/lib/libopenvino_tokenizers.so`` beside
the package) from C++, which PyInstaller cannot see: without it a pipeline fails to load with
"module 'openvino_tokenizers' has no attribute '_ext_path'".
"""

from pathlib import Path

from PyInstaller.utils.hooks import copy_metadata, get_package_paths

_, _tok = get_package_paths("openvino_tokenizers")

hiddenimports = ["openvino", "openvino_tokenizers"]
binaries = [(str(p), "openvino_tokenizers/lib") for p in sorted((Path(_tok) / "lib").glob("*.so*"))]
datas = copy_metadata("openvino-genai")  # the probe reads the version from its dist-info
