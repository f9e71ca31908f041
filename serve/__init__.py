"""Ray Serve application: an OpenAI-compatible chat endpoint over a frozen VLM pruned by AutoSelect.

``serve.app:build_app`` is the import path for ``serve run`` / ``serve deploy`` (see
``serve/config.yaml``). Importing this package is cheap; the heavy modules load in the replicas.
"""
