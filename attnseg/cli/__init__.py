"""Command-line entry points (``attnseg-train``, ``attnseg-test``, ``attnseg-infer``; also ``tools/*.py``)."""
