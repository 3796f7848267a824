"""stbllm converter: Hugging Face / GGUF models -> packed .stb files (`stbllm-convert`)."""
