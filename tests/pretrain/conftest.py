"""Fixtures for tests/pretrain: the session-wide MLflow server lives in tests/mlflow_fixture.py."""

from tests.mlflow_fixture import mlflow_server  # noqa: F401 - re-exported as a fixture
