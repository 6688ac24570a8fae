"""The response cache and the HTTP caching rules it follows."""
