"""The admin API's request bodies (strict: a wrong type or an unknown field is a 400 naming it) and the
shapes of its answers (TypedDicts that mypy checks the built bodies against)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from aimichat.keys.service import KeyLimits

_LARGEST = 2**31 - 1  # the columns are 32-bit integers on PostgreSQL


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- requests ------------------------------------------------------------------------------------


class AccountCreate(_Body):
    email: str = Field(max_length=320, examples=["ada@example.com"])
    password: str = Field(max_length=1024, description="At least 8 characters.")
    tier: str | None = Field(None, max_length=64, description="Default: the server's default tier.")
    admin: bool = Field(False, description="May use the admin web pages.")


class AccountUpdate(_Body):
    tier: str | None = Field(None, max_length=64)
    disabled: bool | None = Field(None, description="true: its keys and sessions stop working at once.")
    admin: bool | None = None


class TierSave(_Body):
    """A new tier needs ``daily_credits``; for an existing one, the fields sent change and the rest stay
    (``null`` removes a limit; ``models: null`` lets the tier use every model)."""

    daily_credits: int | None = Field(None, ge=0, le=_LARGEST)
    monthly_credits: int | None = Field(None, ge=0, le=_LARGEST)
    cost_rule: Literal["per_request", "per_token"] | None = None
    credits_per_1k_tokens: int | None = Field(None, ge=1, le=_LARGEST)
    rpm: int | None = Field(None, ge=1, le=_LARGEST, description="Default requests per minute of each key.")
    tpm: int | None = Field(None, ge=1, le=_LARGEST, description="Default tokens per minute of each key.")
    max_keys: int | None = Field(None, ge=0, le=_LARGEST, description="Most active keys an account may have.")
    max_concurrent: int | None = Field(None, ge=1, le=_LARGEST, description="Requests an account may run at once.")
    max_prompt_tokens: int | None = Field(None, ge=1, le=_LARGEST, description="Longest prompt a request may send.")
    max_n: int | None = Field(None, ge=1, le=_LARGEST, description="Most choices (n) a request may ask for.")
    models: list[str] | None = Field(None, description="The only models this tier may use; null: every model.")


class PriceSet(_Body):
    """``per_request``, or both ``prompt_per_1m`` and ``completion_per_1m``."""

    per_request: int | None = Field(None, ge=0, le=_LARGEST)
    prompt_per_1m: float | None = Field(None, ge=0, allow_inf_nan=False)
    completion_per_1m: float | None = Field(None, ge=0, allow_inf_nan=False)


class KeyLimitsBody(_Body):
    """A key's limits: a field sent sets it (``null`` removes it), a field left out stays."""

    daily_cap: int | None = Field(None, description="Credits this key may use a UTC day.")
    monthly_cap: int | None = Field(None, description="Credits this key may use a UTC month.")
    rpm: int | None = Field(None, description="Requests per minute (default: the tier's).")
    tpm: int | None = Field(None, description="Prompt + completion tokens per minute (default: the tier's).")
    expires_at: str | None = Field(None, description="ISO 8601, e.g. 2027-01-31T12:00:00Z.")
    models: list[str] | None = Field(None, description="The only models this key may use.")
    ips: list[str] | None = Field(None, description="CIDR ranges it may be used from.")


class KeyCreate(KeyLimitsBody):
    name: str = Field(max_length=200, examples=["production"])


class KeyRotate(_Body):
    grace: int | str | None = Field(
        None, description='How long the old secret keeps working: seconds, or "1h", "24h", "7d" (at most 30 days).'
    )


class AlertsSet(_Body):
    """An account's usage alerts: the fields sent change, the other stays."""

    percents: list[int] | None = Field(
        None,
        max_length=100,
        description="Thresholds, percent (1 to 100) of each allotment: the account's day and month, each "
        "key's caps; at most 5. [] turns alerts off.",
        examples=[[80, 100]],
    )
    email: bool | None = Field(None, description="Also alert by email to the account's address (webhooks always).")


class ModelAdd(_Body):
    """A model to add, or to redefine (``aimichat models add``): ``engine`` and that engine's settings. A
    setting left out is the server's (``AIMICHAT_*`` of the same name); a setting of the other engine is
    a 400, as an option silently ignored would mislead."""

    name: str = Field(max_length=128, examples=["llama-70b"])
    engine: Literal["embedded", "upstream"]
    # embedded
    gguf: str | None = Field(None, max_length=4096, description="[embedded] The GGUF file, on every replica.")
    parallel: int | None = Field(None, description="[embedded] Requests answered together (1 to 256).")
    threads: int | None = Field(None, ge=1, le=_LARGEST, description="[embedded] CPU threads.")
    load_on_demand: bool | None = Field(None, description="[embedded] Load at the first request, not at start.")
    idle_unload: float | None = Field(None, allow_inf_nan=False, description="[embedded] Unload after N idle seconds.")
    # upstream
    urls: list[str] | None = Field(
        None, max_length=16, description="[upstream] OpenAI-compatible base URLs: the first, the rest on failure."
    )
    upstream_model: str | None = Field(None, max_length=256, description="[upstream] The name sent upstream.")
    api_key_env: str | None = Field(
        None, max_length=128, description="[upstream] The NAME of the variable holding its key (never the key)."
    )
    multimodal: bool | None = Field(None, description="[upstream] It reads images, audio and files.")
    strip_fields: list[str] | None = Field(None, max_length=64, description="[upstream] Request fields removed.")
    refuse_fields: list[str] | None = Field(None, max_length=64, description="[upstream] Request fields refused (400).")
    # both
    context_length: int | None = Field(None, le=_LARGEST, description="Context window in tokens.")
    system_prompt: str | None = Field(None, max_length=100_000, description="Used when a request sends none.")
    temperature: float | None = Field(None, allow_inf_nan=False, description="Default temperature (0 to 2).")
    top_p: float | None = Field(None, allow_inf_nan=False, description="Default top_p (above 0, at most 1).")

    def settings(self) -> dict[str, Any]:
        """The engine settings sent (``null`` as good as left out)."""
        return {k: v for k, v in self.model_dump(exclude={"name", "engine"}).items() if v is not None}


class SamplingSet(_Body):
    """A model's default sampling: a field sent sets it (``null`` removes it: OpenAI's 1.0), one left out stays."""

    temperature: float | None = Field(None, allow_inf_nan=False, description="0 to 2.")
    top_p: float | None = Field(None, allow_inf_nan=False, description="Above 0, at most 1.")


class AliasAdd(_Body):
    alias: str = Field(max_length=128, examples=["gpt-4o-mini"])
    model: str = Field(max_length=128, examples=["aimichat-1"])


class SourceAdd(_Body):
    """An upstream registered as a whole (``aimichat models discover``): every model its ``/models`` lists
    is served as ``prefix`` + its id. Registering a prefix again replaces its URLs."""

    urls: list[str] = Field(min_length=1, max_length=16, examples=[["http://127.0.0.1:11434/v1"]])
    prefix: str = Field("", max_length=64, examples=["ollama/"])
    api_key_env: str | None = Field(None, max_length=128, description="The NAME of the variable holding its key.")


LIMIT_FIELDS = tuple(KeyLimits.__dataclass_fields__)


# -- answers -------------------------------------------------------------------------------------


class AccountBody(TypedDict):
    object: Literal["account"]
    id: int
    email: str
    tier: str
    admin: bool
    disabled: bool
    created: str


class AlertsBody(TypedDict):
    object: Literal["alert_settings"]
    account_id: int
    percents: list[int]
    email: bool


class Page(TypedDict):
    page: int
    per_page: int
    total: int
    has_more: bool


class AccountList(Page):
    object: Literal["list"]
    data: list[AccountBody]


class TierBody(TypedDict):
    object: Literal["tier"]
    name: str
    daily_credits: int
    monthly_credits: int | None
    cost_rule: str
    credits_per_1k_tokens: int
    rpm: int | None
    tpm: int | None
    max_keys: int | None
    max_concurrent: int | None
    max_prompt_tokens: int | None
    max_n: int | None
    models: list[str] | None


class UsageRow(TypedDict):
    day: str
    account_id: int
    key_id: int | None
    model: str
    requests: int
    credits: int
    prompt_tokens: int
    completion_tokens: int


# "from" is a Python keyword: the functional form names the field as the API does.
UsageBody = TypedDict("UsageBody", {"object": Literal["list"], "from": str, "to": str, "data": list[UsageRow]})


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[dict[str, Any]]
    hidden: list[str]


class SourceBody(TypedDict):
    object: Literal["model_source"]
    prefix: str
    urls: list[str]
    api_key_env: str | None
    models: list[str]  # what this replica serves of it now (empty until it is first read)
