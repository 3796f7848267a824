"""stbllm runtime: load a packed `.stb` structured-binary model and generate text."""
from ._core import FormatError
from .model import Model
from .stbfile import StbReader, StbWriter
from .tokenizer import NoTokenizerError

__all__ = ["FormatError", "Model", "NoTokenizerError", "StbReader", "StbWriter"]
__version__ = "0.1.0"
