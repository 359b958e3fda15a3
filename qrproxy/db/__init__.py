"""Database access: typed models, engine/session set-up, Alembic upgrades."""
