"""Fixtures shared by several test files (pytest finds them here without an import).

Plain helper functions that several files call are in `tests/helpers.py`. A test file never imports
another test file: what two files share lives in one of these two modules.
"""
