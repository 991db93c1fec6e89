"""Persistence on PostgreSQL: connection, embedded server, migrations, repositories."""
