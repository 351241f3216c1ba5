"""Celery apps the integration tests run in real `celery worker` processes."""
