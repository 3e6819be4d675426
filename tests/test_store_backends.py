"""The metadata store on SQLite (the default) and on PostgreSQL: schema migrations, old
databases kept, and a live server whose users, futures and checkpoints live in PostgreSQL.

The PostgreSQL cases run where LATHE_TEST_DATABASE_URL names a server this test may create
databases on (.ci/run starts one); elsewhere they are skipped.
"""

from __future__ import annotations

from pathlib import Path

import alembic.command
import pytest
import sqlalchemy as sa

from lathe.protocol.messages import LoraConfig
from lathe.store import migrate
from lathe.store.db import (
    Base,
    CheckpointRow,
    FutureRow,
    SessionRow,
    Store,
    TrainingRunRow,
    UserRow,
)

from conftest import needs_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lathe.db'}"
    return request.getfixturevalue("postgres_url")


def test_a_new_database_is_migrated_to_the_newest_revision_and_reopens(database_url):
    store = Store(database_url)
    assert migrate.current_revision(store.engine) == migrate.head_revision() != "0001"
    tables = set(sa.inspect(store.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    store.add(UserRow(name="alice"))
    again = Store(database_url)  # a second replica, or a restart: nothing to do, nothing lost
    assert again.get(UserRow, 1).name == "alice"


def test_rows_round_trip_including_big_sizes_and_binary_payloads(database_url):
    store = Store(database_url)
    store.add(UserRow(name="bob"))
    store.add(FutureRow(request_id="r1", owner_id=1, kind="sample", payload=b"\x00\xff" * 4))
    assert store.get(FutureRow, "r1").payload == b"\x00\xff" * 4
    store.add(SessionRow(session_id="s", owner_id=1))
    store.add(TrainingRunRow.of_adapter("s:train:0", 1, "s", "base", LoraConfig(rank=4)))
    big = 3 * 2**30  # a merged export passes 2 GiB: PostgreSQL's INTEGER would overflow
    store.add(
        CheckpointRow(
            model_id="s:train:0",
            owner_id=1,
            kind="weights",
            name="c",
            directory="/x",
            size_bytes=big,
        )
    )
    with store.session() as s:
        assert s.scalars(sa.select(CheckpointRow.size_bytes)).one() == big


def test_a_sqlite_database_from_before_migrations_is_stamped_and_kept(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as c:  # revision 0001's tables, as create_all made them then
        alembic.command.upgrade(migrate.config(c), migrate.FIRST_REVISION)
        c.execute(sa.text("DROP TABLE alembic_version"))
        c.execute(sa.text("INSERT INTO users (name, created_at) VALUES ('carol', '2026-01-01')"))
    engine.dispose()
    store = Store(url)
    assert migrate.current_revision(store.engine) == migrate.head_revision()
    assert store.get(UserRow, 1).name == "carol"
    store.add(FutureRow(request_id="r", owner_id=1, kind="sample", replica_id="a"))  # 0002's
    assert store.get(FutureRow, "r").replica_id == "a"


@needs_postgres
@pytest.mark.slow
def test_a_server_on_postgresql_trains_saves_and_lists(postgres_url, tiny_qwen3, tmp_path):
    """SDK training against `lathe serve --database-url postgresql+psycopg://...`: its
    sessions, runs, futures and checkpoints are rows in PostgreSQL, and a restart on the
    same database still lists the checkpoint."""
    import numpy as np
    import tinker
    from tinker import types

    from lathe.local_server import LOCAL_API_KEY, LocalServer

    models = {"tiny-qwen3": tiny_qwen3}
    tokens = np.random.default_rng(0).integers(3, 400, 17).tolist()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )
    with LocalServer(models, tmp_path, "--database-url", postgres_url) as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=0).result()
            fb = tc.forward_backward([datum], "cross_entropy").result()
            assert fb.metrics["loss:sum"] > 0
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            path = tc.save_state("on-postgres").result().path
    store = Store(postgres_url)
    with store.session() as s:
        assert s.scalars(sa.select(TrainingRunRow.model_id)).all() == [tc.model_id]
        assert s.scalar(sa.select(sa.func.count()).select_from(FutureRow)) >= 3
        assert [c.tinker_path for c in s.scalars(sa.select(CheckpointRow))] == [path]
    with LocalServer(models, tmp_path, "--database-url", postgres_url) as srv:
        rest = tinker.RestClient(base_url=srv.base_url, api_key=LOCAL_API_KEY)
        listed = rest.list_checkpoints(tc.model_id).result().checkpoints
        assert [c.tinker_path for c in listed] == [path]


@needs_postgres
def test_cut_database_connections_are_replaced_and_nothing_is_lost(
    postgres_url, tiny_qwen3, tmp_path
):
    """Every connection of a running server to PostgreSQL is cut (a database restart or a
    network blip): the next requests open new ones, training goes on, a checkpoint saved
    before is still listed and one saved after is too."""
    import tinker
    from tinker import types

    from lathe.local_server import LOCAL_API_KEY, LocalServer

    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(3, 20))),
        loss_fn_inputs={"target_tokens": list(range(4, 21))},
    )
    with LocalServer({"tiny-qwen3": tiny_qwen3}, tmp_path, "--database-url", postgres_url) as srv:
        with tinker.ServiceClient(base_url=srv.base_url, api_key=LOCAL_API_KEY) as sc:
            tc = sc.create_lora_training_client(base_model="tiny-qwen3", rank=4).result()
            tc.forward_backward([datum], "cross_entropy").result()
            before = tc.save_state("before").result().path
            admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                cut = c.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
            admin.dispose()
            assert cut >= 1
            tc.forward_backward([datum], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            after = tc.save_state("after").result().path
            rest = tinker.RestClient(base_url=srv.base_url, api_key=LOCAL_API_KEY)
            listed = [
                c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints
            ]
            assert listed == [before, after]


def test_sample_completions_keep_their_order_after_acknowledged_ones_are_deleted(database_url):
    """/retrieve_futures' cursor: a completion's seq is above every earlier one, even when
    the poller acknowledged (deleted) them all (SQLite would otherwise reuse row ids)."""
    from lathe.store import completions

    store = Store(database_url)
    store.add(UserRow(name="dana"))
    seqs = []
    for i in range(3):
        rid = f"req-{i}"
        store.add(
            FutureRow(request_id=rid, owner_id=1, kind="sample", natural_key=f"sample:s:0:{i}")
        )
        store.finish_future(rid, "done", "application/x-protobuf", b"xyz", None, None)
        (row,) = completions.completions_after(store, "s:0", 0, seqs[-1] if seqs else 0)
        assert (row.request_id, row.state, row.payload_size, row.clone) == (rid, "finished", 3, 0)
        seqs.append(row.seq)
        completions.acknowledge(store, "s:0", 0, row.seq)
    assert seqs == sorted(set(seqs))
