"""What the sidecar tells its operator: Prometheus metrics, usage history, event-loop lag, log redaction."""
