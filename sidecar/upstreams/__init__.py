"""What is specific to an upstream: Plex (token injection, scrubbing, transcode sessions), MCP, reachability."""
