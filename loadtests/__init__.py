"""Locust load tests (arrive with the load-test issue)."""
