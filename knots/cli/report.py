"""``python -m knots.cli.report RUN_DIR...``: ``knots-report`` (:mod:`knots.report.cli`), next to the
other commands' modules (``knots.cli.merge``, ``knots.cli.run``)."""

from knots.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
