"""Schema migrations (Alembic) for every database lathe opens, SQLite or PostgreSQL.

`upgrade` brings a database to the newest revision in store/migrations/versions when a
`Store` opens it: a new database gets the whole schema, an older one the revisions it lacks.
SQLite databases made before migrations existed hold exactly revision 0001's tables; they
are stamped with it first, so nothing already saved is touched. Several API replicas may
open one PostgreSQL database at once: on PostgreSQL the upgrade holds an advisory lock, so
one replica migrates and the others find it done.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"
LOCK_KEY = 0x6C61746865  # "lathe": the advisory lock replicas take around an upgrade


def config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine) -> None:
    """Migrate the database behind `engine` to the newest revision."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        tables = set(inspect(connection).get_table_names())
        if "alembic_version" not in tables and "users" in tables:
            command.stamp(config(connection), FIRST_REVISION)  # made before migrations
        command.upgrade(config(connection), "head")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if "alembic_version" not in inspect(connection).get_table_names():
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def head_revision() -> str:
    """The newest revision in store/migrations/versions."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head
