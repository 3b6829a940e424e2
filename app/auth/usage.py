"""Usage reports: totals and per-day rows from the recorded requests."""

from __future__ import annotations

from datetime import date

from sqlalchemy import case, func, select

from app.auth.models import UsageRecord
from app.auth.schemas import UsageDay, UsageReport, UsageTotals
from app.auth.store import KeyStore
from app.errors import InvalidParams


def usage_report(store: KeyStore, key_id: int | None = None, model: str | None = None,
                 start: date | None = None, end: date | None = None,
                 all_keys: bool = False) -> UsageReport:
    """Requests, errors, tokens and prompt words per day and in total, `start`..`end`
    inclusive. `key_id` None means requests without a key unless `all_keys`."""
    if start is not None and end is not None and end < start:
        raise InvalidParams("'to' must not be before 'from'.", param="to")
    record = UsageRecord
    query = select(
        record.day, func.count(), func.sum(case((record.status >= 400, 1), else_=0)),
        func.sum(record.prompt_tokens), func.sum(record.completion_tokens),
        func.sum(record.prompt_words),
    ).group_by(record.day).order_by(record.day)
    if key_id is not None:
        query = query.where(record.key_id == key_id)
    elif not all_keys:
        query = query.where(record.key_id.is_(None))
    if model is not None:
        query = query.where(record.model == model)
    if start is not None:
        query = query.where(record.day >= start)
    if end is not None:
        query = query.where(record.day <= end)
    with store.engine.connect() as connection:
        rows = connection.execute(query).all()
    days = [UsageDay(day=day, requests=n, errors=int(errors or 0), prompt_tokens=int(p or 0),
                     completion_tokens=int(c or 0), words=int(w or 0))
            for day, n, errors, p, c, w in rows]
    totals = UsageTotals(**{field: sum(getattr(d, field) for d in days)
                            for field in UsageTotals.model_fields})
    return UsageReport(key_id=key_id, model=model, from_=start, to=end, totals=totals,
                       days=days)
