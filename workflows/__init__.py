"""Orchestration: deterministic Temporal workflows that speak schemas and call activities."""
