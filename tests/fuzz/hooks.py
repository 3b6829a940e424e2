"""schemathesis hooks of tests/api/test_schemathesis.py, loaded through SCHEMATHESIS_HOOKS.

The run calls with one admin key. A PATCH, revoke or rotate aimed at that key's own id could
throttle the key (rpm, quotas, allowed_models) and quietly turn the rest of the run into 429s
and 403s, which every check accepts; the configured admin key is also refused by design
(app/auth/admin_rules.py). Such a case is aimed at a spare key the test created instead, so
those operations are still fuzzed, on a key nobody else uses. The ids come from the
environment the test sets.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

OWN_KEY_ID = os.environ.get("FUZZ_OWN_KEY_ID")
SPARE_KEY_ID = os.environ.get("FUZZ_SPARE_KEY_ID")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    key_id = case.path_parameters.get("key_id")
    if (OWN_KEY_ID and SPARE_KEY_ID and case.method.upper() != "GET"
            and str(key_id) == OWN_KEY_ID):
        case.path_parameters["key_id"] = int(SPARE_KEY_ID)
