"""stbllm converter: Hugging Face / GGUF models -> packed .stb files (`stbllm-convert`)."""
__version__ = "0.1.0"
