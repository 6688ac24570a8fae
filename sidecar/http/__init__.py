"""The HTTP edge: listener, the pipeline (the order of stages), canonical form, the forwarder, errors, access log."""
