"""Contracts: the pydantic models that cross every boundary (repository, activities, workflows, CLI)."""
