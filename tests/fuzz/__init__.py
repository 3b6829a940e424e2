"""Configuration and hooks of the schemathesis run (tests/api/test_schemathesis.py)."""
