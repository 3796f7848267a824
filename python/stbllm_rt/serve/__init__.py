"""`stbllm-serve`: an OpenAI-compatible HTTP server with continuous batching (FastAPI + uvicorn), also deployable
on Ray Serve. See docs/serving.md."""
from .app import ServerSettings, create_app
from .engine import GenerationRequest, QueueFull, Sampling, ServingEngine

__all__ = ["GenerationRequest", "QueueFull", "Sampling", "ServerSettings", "ServingEngine", "create_app"]
