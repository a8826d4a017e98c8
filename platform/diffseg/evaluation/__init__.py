"""Evaluation: THE evaluation path (methods x data sets, `split/name` keys) and the baselines it compares against."""
