"""Settings of the GPT client: endpoint (OpenAI, any OpenAI-compatible server, or Azure), call defaults, retries.

Environment variables (read by ``GPTConfig.from_env``):

- ``OPENAI_API_KEY`` (required) — the key; never printed, logged, cached or written to result files.
- ``OPENAI_ORGANIZATION`` (optional) — sent as the organization header.
- ``OPENAI_BASE_URL`` (optional) — any OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1``.
- ``OPENAI_API_BASE`` (optional) — as upstream: an **Azure** endpoint (``https://<name>.openai.azure.com``);
  its presence switches to Azure mode. The deployment comes from ``azure_deployment`` (one deployment for
  every model) or ``azure_deployments`` (model → deployment; by default ``gpt-3.5-turbo`` → ``gpt-35-turbo``
  as Azure names it, any other model is its own deployment name); ``OPENAI_API_VERSION`` or
  ``azure_api_version`` gives the api-version.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import MissingAPIKeyError

DEFAULT_AZURE_API_VERSION = "2024-06-01"
# Azure does not allow dots in deployment names; this is the name Azure's own model catalogue uses.
DEFAULT_AZURE_DEPLOYMENTS = {"gpt-3.5-turbo": "gpt-35-turbo"}


@dataclass
class GPTConfig:
    """Everything the client needs; call parameters here are defaults that each call may override."""

    api_key: str = field(default="", repr=False)
    organization: str | None = None
    base_url: str | None = None
    azure_endpoint: str | None = None
    azure_api_version: str = DEFAULT_AZURE_API_VERSION
    azure_deployment: str | None = None
    azure_deployments: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_AZURE_DEPLOYMENTS))
    # call defaults (upstream's wrapper defaults: gpt-4, temperature 1, max_tokens 2048, top_p 1);
    # None leaves a parameter out of the request
    model: str = "gpt-4"
    temperature: float | None = 1.0
    max_tokens: int | None = 2048
    top_p: float | None = 1.0
    system_prompt: str = "You are a capable AI assistant; answer carefully and helpfully."
    # transport and retries
    timeout: float = 120.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    concurrency: int = 4
    # persistence and accounting
    cache_path: str | None = None
    prices: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"GPTConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.concurrency < 1:
            raise ValueError(f"GPTConfig.concurrency must be >= 1, got {self.concurrency}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("GPTConfig.backoff_base and backoff_max must be >= 0")

    @property
    def is_azure(self) -> bool:
        return bool(self.azure_endpoint)

    def deployment_for(self, model: str) -> str:
        """The Azure deployment that serves ``model``."""
        if self.azure_deployment:
            return self.azure_deployment
        return self.azure_deployments.get(model, model)

    def endpoint_id(self, model: str) -> str:
        """Where a call for ``model`` goes (no credentials); part of the cache key."""
        if self.is_azure:
            return f"azure:{self.azure_endpoint.rstrip('/')}/deployments/{self.deployment_for(model)}"
        return f"openai:{(self.base_url or 'https://api.openai.com/v1').rstrip('/')}"

    def require_key(self) -> None:
        if not self.api_key:
            raise MissingAPIKeyError(
                "no OpenAI API key: set the OPENAI_API_KEY environment variable (for Azure, the Azure key; for a "
                "local OpenAI-compatible server any non-empty value such as 'EMPTY')")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "GPTConfig":
        """Build from a dict (e.g. a YAML ``gpt:`` section); an unknown key is an error that names it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown GPT config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(values))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, require_key: bool = True,
                 **overrides: Any) -> "GPTConfig":
        """Endpoint and key from the environment (see the module docstring); ``overrides`` win (None = unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "api_key": env.get("OPENAI_API_KEY", ""),
            "organization": env.get("OPENAI_ORGANIZATION") or None,
            "base_url": env.get("OPENAI_BASE_URL") or None,
            "azure_endpoint": env.get("OPENAI_API_BASE") or None,
        }
        if env.get("OPENAI_API_VERSION"):
            values["azure_api_version"] = env["OPENAI_API_VERSION"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls.from_mapping(values)
        if require_key:
            config.require_key()
        return config
