"""Offline evaluation (pure core): protocols and splits, metrics, baseline recommenders, the report."""
