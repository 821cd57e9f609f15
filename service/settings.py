"""The one settings object of the service. Every field reads the environment variable `RBR_<NAME>`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rbr_model.reward import default_weights_path
from rbr_model.stack import StackSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RBR_", env_file=None, extra="ignore")

    # -- serving ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address uvicorn binds (0.0.0.0 in containers).")
    port: int = Field(8000, description="Port uvicorn listens on.")
    log_level: str = Field("info", description="Python log level.")

    # -- policy and weights -------------------------------------------------------------------------
    policy_path: str | None = Field(None, description="Policy YAML; default: the packaged default policy.")
    weights_path: str | None = Field(None, description="Weights JSON; default: the packaged default weights (those "
                                     "fitted on top of the embedded RM when rm_engine=vllm serves it).")

    # -- grader engine ------------------------------------------------------------------------------
    engine: Literal["vllm", "remote"] = Field(
        "vllm", description="vllm: in-process vLLM (GPU or CPU build); remote: an OpenAI-compatible vLLM server."
    )
    grader_model: str | None = Field(
        None, description="Grader model path or id; default: the embedded SmolLM2-135M (rbr model prepare)."
    )
    remote_url: str | None = Field(None, description="Base URL of the remote vLLM server (engine=remote).")
    remote_model: str | None = Field(None, description="Served model name on the remote server; unset: ask it.")
    remote_api_key: SecretStr | None = Field(None, description="Bearer key for the remote vLLM server.")
    remote_timeout_s: float = Field(
        60.0, gt=0, description="Seconds one HTTP request to the remote grading servers may take before a 503 "
        "(a batch of 32 prompts on a loaded CPU server can need more than the default)."
    )
    max_model_len: int = Field(4096, description="Longest grading prompt in tokens (vLLM max_model_len).")
    max_num_seqs: int = Field(64, description="vLLM max_num_seqs: sequences batched per engine step.")
    enable_prefix_caching: bool = Field(True, description="vLLM prefix caching (shared few-shot prefixes).")
    enforce_eager: bool = Field(True, description="Skip graph compilation (fast start; right for CPU).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Fraction of GPU memory the grader's vLLM may use (GPU only)."
    )
    max_inflight_judgments: int = Field(
        4096, description="Judgments admitted at once; a request that would exceed it gets 429."
    )
    max_engine_requests: int = Field(
        4096, ge=1, description="Grading calls the grader keeps in its engines at once (one prompt each in process, "
        "a batch of prompts to a remote server); more wait in the grader, not inside the engine.",
    )
    calibration_path: str | None = Field(None, description="Per-proposition calibration JSON for P(yes).")
    heads: str = Field(
        "auto",
        description="Learned proposition heads: a heads file (`rbr heads fit`), `none` (prompted grader only), or "
        "`auto`: the packaged heads when the policy is the packaged default and the grader the embedded model. "
        "Headed propositions are graded by one trunk forward pass per completion; the others by their prompt.",
    )
    heads_trunk: str | None = Field(
        None, description="Trunk folder for the heads (a model cut after the heads' layer); default: the embedded "
        "model's trunk at that layer (rbr model prepare). With engine=remote: a local copy of the served trunk.",
    )
    heads_url: str | None = Field(
        None, description="Base URL of a vLLM server running the trunk with --runner pooling (engine=remote).",
    )
    heads_gpu_memory_utilization: float = Field(
        0.05, gt=0, le=1,
        description="Fraction of GPU memory the heads' trunk engine may use (in process, GPU only). vLLM counts "
        "each engine's fraction of the whole card, so the in-process engines' fractions must sum to at most 1.",
    )
    grader_layout: Literal["proposition_first", "conversation_first"] = Field(
        "proposition_first",
        description="Which part of a grading prompt comes first and is shared through the prefix cache: the "
        "proposition's instructions and examples (best when conversations are shorter than them), or the "
        "conversation (best for long conversations; see benchmarks/RESULTS.md). Changes every feature.",
    )

    # -- reward model -------------------------------------------------------------------------------
    rm_engine: Literal["none", "vllm", "remote"] = Field(
        "none", description="Where rm_score comes from when a request omits it: none, vllm (in-process), remote."
    )
    rm_model: str | None = Field(None, description="Reward (classification) model path for rm_engine=vllm; unset: "
                                 "the embedded helpful-only RM (rbr model prepare --rm).")
    rm_url: str | None = Field(None, description="Base URL of a vLLM server with /classify for rm_engine=remote.")
    rm_api_key: SecretStr | None = Field(None, description="Bearer key for the remote RM server (rm_engine=remote).")
    rm_gpu_memory_utilization: float = Field(
        0.1, gt=0, le=1,
        description="Fraction of GPU memory the in-process RM's vLLM may use (rm_engine=vllm, GPU only). vLLM "
        "counts each engine's fraction of the whole card, so the in-process engines' fractions must sum to at "
        "most 1.",
    )
    default_rm_score: float | None = Field(
        None, description="rm_score used when a request omits it and no RM engine is set; unset: 422."
    )

    # -- cache --------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis:// or rediss:// URL (auth and TLS as URLs allow); unset: in-process LRU cache."
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, description="Feature cache entry lifetime in seconds.")
    local_cache_size: int = Field(100_000, description="Entries in the in-process LRU cache (no Redis).")
    redis_timeout_s: float = Field(0.05, description="Per-operation Redis timeout; slower counts as an error.")
    redis_breaker_s: float = Field(5.0, description="After a Redis error, skip Redis for this many seconds.")

    # -- protection ---------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated Bearer keys for the reward routes; empty: open."
    )
    admin_key: SecretStr | None = Field(None, description="Bearer key for /v1/admin/*; unset: admin disabled.")
    max_items: int = Field(1024, description="Items per request (413 above).")
    max_chars: int = Field(65_536, description="Characters per prompt or completion text (413 above).")
    max_body_bytes: int = Field(32 * 1024 * 1024, description="Request body size (413 above).")
    request_timeout_s: float | None = Field(None, description="Per-request deadline in seconds (504 after).")
    retry_after_s: int = Field(1, ge=0, description="Least Retry-After seconds sent with 429; the server sends more, "
                               "drawn between the time its work in flight needs to make room and to drain (up to "
                               "60, or this value when larger).")

    @model_validator(mode="after")
    def _engines_can_start(self) -> Settings:
        """Engine settings that cannot work (a remote engine without its URL, GPU fractions over 1) fail here, at
        `rbr serve`, rather than as a 503 once the engines start."""
        problems = self.stack().problems(lambda name: f"RBR_{name.upper()}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def weights_file(self) -> str:
        """The weights to serve: `weights_path`, else the packaged ones that belong to the RM served."""
        embedded_rm = self.rm_engine == "vllm" and not self.rm_model
        return self.weights_path or str(default_weights_path(embedded_rm=embedded_rm))

    def stack(self) -> StackSettings:
        """The grading stack's settings (`rbr_model.stack`): engines, heads, grader, RM."""
        return StackSettings.from_values(_Revealed(self))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v


class _Revealed:
    """The settings with their secrets readable, for the builder only (never logged)."""

    def __init__(self, settings: Settings):
        self._settings = settings

    def __getattr__(self, name: str) -> object:
        value = getattr(self._settings, name)
        return value.get_secret_value() if isinstance(value, SecretStr) else value
