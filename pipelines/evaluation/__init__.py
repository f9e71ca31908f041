"""Evaluation harness: AutoSelect and the training-free baselines on the same held-out tasks.

``tasks/`` builds the examples, ``methods`` wraps each way of pruning behind one forward,
``scoring`` turns logits into exact answer log-likelihoods whatever columns a method dropped,
``runner`` loops over tasks, batches and methods, ``report`` and ``plots`` write the results.
The command line is ``pipelines/evaluate.py``.
"""
