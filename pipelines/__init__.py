"""The jobs, one stage each: a thin entry script here (preprocess, train, evaluate, promote,
align_projector, packaged_corpora, build_backbone) and the stage's library in its package
(preprocessing/, training/, evaluation/, align/, corpora/).

Built on ``mlops/`` (loaders, MLflow, storage), which ``serve/`` shares; never imports ``serve/``.
"""
