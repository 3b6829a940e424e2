"""API keys, quotas, rate limits and usage records."""
