"""Accuracy of the attention policies against full KV: tasks, runs, reports (``icecache eval``)."""
