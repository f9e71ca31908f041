"""What training, evaluation and serving share: the VLM loader, the one scorer loader, MLflow
tracking and registry, S3/local storage.

Imports only ``autoselect``: ``pipelines`` and ``serve`` both build on this and never on each
other, so a scorer is loaded, checked and tracked the same way everywhere.
"""
