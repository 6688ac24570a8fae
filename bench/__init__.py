"""The benchmark harness (``bench/run``): Sidecar side by side with nginx and a bare forwarder.

Not part of the installed package; ``bench/run`` puts the repository root on
``sys.path`` and runs ``python -m bench.harness``. See ``bench/README.md``.
"""
