"""Prefect flows: thin wrappers around pipeline/ stages."""
