"""Rate limits (GCRA), quotas and concurrency, in process or on Redis."""
