"""Ray entry points (preprocess, train, evaluate, promote) and the small helpers they share.

Built on ``mlops/`` (loaders, MLflow, storage), which ``serve/`` shares; never imports ``serve/``.
"""
