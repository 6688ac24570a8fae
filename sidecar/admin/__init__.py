"""Key management: the admin API, the key lifecycle shared with the CLI, and delegation (who may grant what)."""
