"""Deployment tests: the ``deploy`` marker (``pytest -m deploy`` selects them; ``make test`` runs them too)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "deploy: starts a real Prefect server, work pools and workers (deploy/)")
