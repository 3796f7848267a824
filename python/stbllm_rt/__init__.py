"""stbllm runtime: load a packed `.stb` structured-binary model and generate text."""
from ._core import FormatError
from .stbfile import StbReader, StbWriter

__all__ = ["FormatError", "StbReader", "StbWriter"]
__version__ = "0.1.0"
