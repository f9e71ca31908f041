"""What only the tests use (``tests.support``: the repository root is on ``sys.path`` in the tests,
their subprocesses and Ray workers; conftest.py puts it there).

Tiny from-config VLMs and synthetic tasks stay in ``autoselect.testing``: the tiny demo, the
evaluation's synthetic tasks and the built-in ``autoselect-testing/tiny-*`` ids need them too.
"""
