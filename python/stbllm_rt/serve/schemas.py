"""Request bodies of the OpenAI routes. Strict types (a string is not a number), ranges checked here; limits that
depend on the model (context length) are checked by the routes."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI fields this server does not implement: a request that sets them gets a 400 naming the field rather than
# an answer that silently ignores them. Unknown fields not listed here are ignored (clients send extras).
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "tool_choice", "functions",
               "function_call", "response_format", "parallel_tool_calls")


class UnsupportedField(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def check_supported(self) -> None:
        """Raises UnsupportedField for a feature this server does not implement (the routes answer 400)."""
        if self.n != 1:
            raise UnsupportedField("n", f"n={self.n} is not supported: this server returns one choice (n=1)")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", "best_of is not supported")
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name) not in (None, False, [], {}):
                raise UnsupportedField(name, f"{name} is not supported by this server")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise UnsupportedField("stop", "at most 16 stop strings")

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
