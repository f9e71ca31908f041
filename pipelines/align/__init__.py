"""Stage-1 alignment of the mini-LLaVA: only the projector learns, on the packaged corpora's
train splits; held-out splits are scored by comparing answer log-likelihoods.

* ``features``: encode records once, cache the frozen encoder's visual tokens on disk.
* ``train``: the single-process CPU loop (AdamW, warm-up + cosine LR, task-weighted batches).
* ``evaluate``: multiple-choice accuracy by the LM's log-likelihood of each full answer.
"""
