"""What only the tests use (imported as ``support``: pytest puts tests/ on ``sys.path``).

Tiny from-config VLMs and synthetic tasks stay in ``autoselect.testing``: the tiny demo, the
evaluation's synthetic tasks and the built-in ``autoselect-testing/tiny-*`` ids need them too.
"""
