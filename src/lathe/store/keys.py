"""Users and their API keys.

A key is shown once, when it is created; the database keeps only its HMAC-SHA256 under a
secret that lives in the data dir (`secret.key`, created on first use, readable by its owner
only), so a copy of the database does not reveal usable keys. The same secret signs JWTs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from lathe.store.db import ApiKeyRow, Store, UserRow, utcnow

KEY_PREFIX = "tml-"
LOCAL_USER = "local"  # the single user of --dev mode and the demo


@dataclass(frozen=True)
class User:
    user_id: int
    name: str


def server_secret(data_dir: Path) -> bytes:
    """The data dir's secret, made on first use. Replicas and the engine service may start
    together: the secret is written whole under a temporary name and linked into place, so
    exactly one is made and nobody reads half of it."""
    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        draft = data_dir / f".secret.key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(draft, path)  # fails if another process made it first: theirs stands
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_bytes()


class KeyStore:
    def __init__(self, store: Store, secret: bytes) -> None:
        self.store = store
        self.secret = secret

    def hash(self, key: str) -> str:
        return hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()

    def user(self, name: str, create: bool = False) -> User | None:
        with self.store.session() as s, s.begin():
            row = s.scalars(select(UserRow).where(UserRow.name == name)).first()
            if row is None and create:
                row = UserRow(name=name)
                s.add(row)
                s.flush()
            return None if row is None else User(row.user_id, row.name)

    def create_key(self, user_name: str) -> tuple[str, int]:
        """A new key for the user (created if new); returns (key, key_id). Shown only now."""
        user = self.user(user_name, create=True)
        assert user is not None
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.store.session() as s, s.begin():
            row = ApiKeyRow(user_id=user.user_id, key_hash=self.hash(key), prefix=key[:10])
            s.add(row)
            s.flush()
            return key, row.key_id

    def authenticate(self, key: str) -> tuple[User, int] | None:
        """The user and key id of a valid, unrevoked key."""
        with self.store.session() as s:
            row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.key_hash == self.hash(key))).first()
            if row is None or row.revoked_at is not None:
                return None
            user = s.get(UserRow, row.user_id)
            if user is None:  # the foreign key forbids it; a key without its user is not valid
                return None
            return User(user.user_id, user.name), row.key_id

    def list_keys(self) -> list[dict]:
        with self.store.session() as s:
            rows = s.execute(
                select(ApiKeyRow, UserRow)
                .join(UserRow, ApiKeyRow.user_id == UserRow.user_id)
                .order_by(ApiKeyRow.key_id)
            ).all()
            return [
                {
                    "key_id": k.key_id,
                    "user": u.name,
                    "prefix": k.prefix,
                    "created_at": k.created_at,
                    "revoked": k.revoked_at is not None,
                }
                for k, u in rows
            ]

    def keys_of(self, user_id: int) -> list[ApiKeyRow]:
        """A user's keys, revoked ones included, oldest first."""
        with self.store.session() as s:
            q = select(ApiKeyRow).where(ApiKeyRow.user_id == user_id).order_by(ApiKeyRow.key_id)
            return list(s.scalars(q))

    def revoke_own(self, user_id: int, key_id: int) -> bool:
        """Revoke one of the user's keys; False if it has no such (unrevoked) key."""
        with self.store.session() as s, s.begin():
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.user_id != user_id or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True

    def revoke(self, name_or_key_id: str) -> int:
        """Revoke one key (by id) or every key of a user (by name); returns how many."""
        with self.store.session() as s, s.begin():
            if name_or_key_id.isdigit():
                q = select(ApiKeyRow).where(ApiKeyRow.key_id == int(name_or_key_id))
            else:
                q = (
                    select(ApiKeyRow)
                    .join(UserRow, ApiKeyRow.user_id == UserRow.user_id)
                    .where(UserRow.name == name_or_key_id)
                )
            rows = [r for r in s.scalars(q) if r.revoked_at is None]
            for r in rows:
                r.revoked_at = utcnow()
            return len(rows)

    def has_keys(self) -> bool:
        with self.store.session() as s:
            return (
                s.scalars(select(ApiKeyRow.key_id).where(ApiKeyRow.revoked_at.is_(None))).first()
                is not None
            )
