"""Prefect flows. They only wire tasks together."""
