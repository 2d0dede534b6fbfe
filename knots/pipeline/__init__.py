"""The ``knots-run`` pipeline: finetune, merge, search, evaluate, report."""
