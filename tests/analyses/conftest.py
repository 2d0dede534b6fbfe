"""The pipeline tests' ``compose_run`` fixture, for the analyses' end-to-end tests."""

from tests.pipeline.conftest import compose_run  # noqa: F401
