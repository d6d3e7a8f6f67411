"""Memory storage: ORM models, the repository, migrations and the embedded PostgreSQL."""
