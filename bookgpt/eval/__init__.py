"""What evaluate.py measures beside likelihood: baselines, text statistics, the n-gram mixture, the report."""
