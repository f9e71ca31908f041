"""The preprocess stage's library (``pipelines/preprocess.py`` is its entry point): reading any
corpus into samples (`corpus`), what makes a sample unusable and its chat messages (`samples`),
encoding with the backbone's processor (`encode`), and the Parquet shard format training reads
(`shards`)."""
