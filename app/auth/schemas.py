"""What the admin API, the CLI and /usage take and return."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from app.auth.keys import utc
from app.json_types import MAX_EXACT_INT
from app.schemas import StrictSchema

Role = Literal["user", "admin"]


def _day_or_moment(value: Any) -> Any:
    """'2026-12-31' is a day (a whole day: see keys.utc); anything longer a datetime."""
    if isinstance(value, str) and len(value.strip()) == 10:
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            return value
    return value


When = Annotated[datetime | date | None, BeforeValidator(_day_or_moment)]
ModelName = Annotated[str, Field(min_length=1, max_length=200)]


class KeyLimits(StrictSchema):
    """The fields a key is created with and that PATCH may change."""

    name: str = Field(min_length=1, max_length=200, description="Owner's name (free text).")
    email: str | None = Field(None, max_length=320, description="Owner's email (free text).")
    organisation: str | None = Field(None, max_length=200, description="Owner's organisation.")
    role: Role = Field("user", description="user, or admin (manages keys, sees all usage).")
    valid_from: When = Field(None, description="UTC; a date means its start.")
    expires_at: When = Field(None, description="UTC; a date means its end.")
    max_requests: int | None = Field(None, ge=0, le=MAX_EXACT_INT, description="Lifetime requests; "
                                     "empty = unlimited.")
    max_tokens: int | None = Field(None, ge=0, le=MAX_EXACT_INT, description="Lifetime prompt + "
                                   "completion tokens; empty = unlimited.")
    rpm: int | None = Field(None, ge=1, le=MAX_EXACT_INT, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, le=MAX_EXACT_INT, description="Tokens per minute.")
    max_parallel: int | None = Field(None, ge=1, le=100_000, description="Concurrent requests.")
    allowed_models: list[ModelName] = Field(default_factory=list, max_length=1000,
                                      description="Models this key may use; empty = all.")

    @model_validator(mode="after")
    def _window_in_order(self) -> KeyLimits:
        start, end = utc(self.valid_from), utc(self.expires_at, end_of_day=True)
        if start is not None and end is not None and end <= start:
            raise ValueError("expires_at must be after valid_from")
        return self


class KeyCreate(KeyLimits):
    """Body of POST /admin/keys."""


class KeyUpdate(StrictSchema):
    """Body of PATCH /admin/keys/{id}: only the fields sent change; null clears a limit."""

    # name and role may be left out, not cleared: the document says they are never null.
    name: Annotated[str | None, WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": 200})] = Field(None, min_length=1,
                                                                       max_length=200)
    email: str | None = Field(None, max_length=320)
    organisation: str | None = Field(None, max_length=200)
    role: Annotated[Role | None, WithJsonSchema({"enum": ["user", "admin"],
                                                 "type": "string"})] = None
    valid_from: When = None
    expires_at: When = None
    max_requests: int | None = Field(None, ge=0, le=MAX_EXACT_INT)
    max_tokens: int | None = Field(None, ge=0, le=MAX_EXACT_INT)
    rpm: int | None = Field(None, ge=1, le=MAX_EXACT_INT)
    tpm: int | None = Field(None, ge=1, le=MAX_EXACT_INT)
    max_parallel: int | None = Field(None, ge=1, le=100_000)
    allowed_models: list[ModelName] | None = Field(None, max_length=1000)

    def changes(self) -> dict[str, object]:
        data = {name: getattr(self, name) for name in self.model_fields_set}
        for required in ("name", "role"):
            if required in data and data[required] is None:
                raise ValueError(f"{required} cannot be empty")
        if "allowed_models" in data and data["allowed_models"] is None:
            data["allowed_models"] = []
        return data


class RevokeRequest(StrictSchema):
    reason: str | None = Field(None, max_length=500, description="Why, for the record.")


class KeyInfo(BaseModel):
    """A key as the store holds it (never its secret)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    prefix: str = Field(description="The secret's first characters, to recognise it.")
    name: str
    email: str | None
    organisation: str | None
    role: Role
    valid_from: datetime | None
    expires_at: datetime | None
    max_requests: int | None
    max_tokens: int | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    allowed_models: list[str]
    revoked_at: datetime | None
    revoked_reason: str | None
    created_at: datetime
    last_used_at: datetime | None
    used_requests: int
    used_tokens: int
    reserved_tokens: int


class KeyCreated(KeyInfo):
    """A new or rotated key: the only time its secret is shown."""

    secret: str


class UsageTotals(BaseModel):
    requests: int = 0
    errors: int = Field(0, description="Requests that ended with a status >= 400.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    words: int = Field(0, description="Words in the prompts (whitespace-separated).")


class UsageDay(UsageTotals):
    day: date


class UsageReport(BaseModel):
    key_id: int | None
    model: str | None
    from_: date | None = Field(serialization_alias="from")
    to: date | None
    totals: UsageTotals
    days: list[UsageDay]
