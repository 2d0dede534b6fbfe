"""``python -m knots.report RUN_DIR...``: the same as ``knots-report``."""

from knots.report.cli import main

raise SystemExit(main())
