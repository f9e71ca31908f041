"""Ray entry points (preprocess, train, evaluate, promote) and the small helpers they share.

Everything Ray-, S3- or MLflow-related lives here, never in ``autoselect/``.
"""
