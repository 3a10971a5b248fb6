"""edgepack packager: the host side. Plans, converts, quantizes, measures and signs bundles.

Heavy dependencies (torch, transformers, llama.cpp's converter) are imported lazily inside the
steps that need them, so `edgepack profiles ...` and `edgepack keys ...` stay fast.
"""

__all__: list[str] = []
