"""The registry's storage on a cell's state disk: blobs as content-addressed files, metadata in
SQLite (WAL). The decisions are ``core.py``'s; this shell does the files and the rows.

Layout under ``<cell state>/registry/``::

    meta.sqlite                         repositories, manifests, tags, blob rows and links
    blobs/<account>/sha256/<hex>        one file per blob of a tenant (written once, by rename)
    uploads/<uuid>                      an upload session's bytes so far

Blobs are shared across the repositories of one tenant (a push of a layer the tenant already
holds in another repository is a mount) and never across tenants: a tenant's namespace is its
own, so a cross-repository mount can only name the tenant's own repositories and says nothing
about anyone else's blobs. A blob is visible in a repository once it was uploaded to or mounted
into it (a link); it is kept while a manifest of the tenant refers to it, and an unreferenced
one is deleted when its grace period has passed (``core.collectable``).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.limits import DEFAULT_LIMITS, Limits
from . import core
from .core import RegistryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (account TEXT, name TEXT, created_s REAL,
    PRIMARY KEY (account, name));
CREATE TABLE IF NOT EXISTS blobs (account TEXT, digest TEXT, size INTEGER, linked_ms INTEGER,
    PRIMARY KEY (account, digest));
CREATE TABLE IF NOT EXISTS links (account TEXT, repo TEXT, digest TEXT,
    PRIMARY KEY (account, repo, digest));
CREATE TABLE IF NOT EXISTS manifests (account TEXT, repo TEXT, digest TEXT, media_type TEXT,
    body BLOB, image_bytes INTEGER, pushed_s REAL, PRIMARY KEY (account, repo, digest));
CREATE TABLE IF NOT EXISTS refs (account TEXT, repo TEXT, manifest TEXT, child TEXT,
    kind TEXT);
CREATE INDEX IF NOT EXISTS refs_child ON refs (account, child);
CREATE INDEX IF NOT EXISTS refs_manifest ON refs (account, repo, manifest);
CREATE TABLE IF NOT EXISTS tags (account TEXT, repo TEXT, tag TEXT, digest TEXT,
    PRIMARY KEY (account, repo, tag));
CREATE TABLE IF NOT EXISTS uploads (uuid TEXT PRIMARY KEY, account TEXT, repo TEXT,
    offset INTEGER, touched_ms INTEGER);
"""

read_block_bytes = 1024 * 1024


def now_ms() -> int:
    return int(time.time() * 1000)


class RepositoryExists(Exception):
    pass


class RepositoryNotEmpty(Exception):
    pass


@dataclass(frozen=True)
class ImageRow:
    digest: str
    media_type: str
    tags: list[str]
    image_bytes: int
    pushed_s: float


class RegistryStore:
    def __init__(self, root: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.root = root
        self.limits = limits
        os.makedirs(os.path.join(root, "uploads"), exist_ok=True)
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        self.db = sqlite3.connect(os.path.join(root, "meta.sqlite"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        # Running sha256 of open uploads (a restart loses them: the file is hashed again).
        self._hashers: dict[str, Any] = {}

    # -- paths ---------------------------------------------------------------------------------
    def blob_path(self, account: str, digest: str) -> str:
        assert account.isdigit()
        return os.path.join(self.root, "blobs", account, "sha256", core.parse_digest(digest))

    def _upload_path(self, uuid: str) -> str:
        assert uuid.replace("-", "").isalnum()
        return os.path.join(self.root, "uploads", uuid)

    # -- repositories --------------------------------------------------------------------------
    def create_repo(self, account: str, name: str) -> dict[str, Any]:
        core.check_repo_name(name)
        (n,) = self.db.execute("SELECT COUNT(*) FROM repos WHERE account=?",
                               (account,)).fetchone()
        if n >= self.limits.registry_repos_per_tenant_max:
            raise RegistryError(403, "DENIED", f"at most "
                                f"{self.limits.registry_repos_per_tenant_max} repositories")
        try:
            self.db.execute("INSERT INTO repos VALUES (?, ?, ?)", (account, name, time.time()))
        except sqlite3.IntegrityError:
            raise RepositoryExists(name) from None
        return self.repo(account, name) or {}

    def repo(self, account: str, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT name, created_s FROM repos WHERE account=? AND name=?",
                              (account, name)).fetchone()
        return {"name": row[0], "created_s": row[1]} if row else None

    def require_repo(self, account: str, name: str) -> None:
        if self.repo(account, name) is None:
            raise core.name_unknown(name)

    def repos(self, account: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT name, created_s FROM repos WHERE account=? ORDER BY name",
                               (account,)).fetchall()
        return [{"name": r[0], "created_s": r[1]} for r in rows]

    def delete_repo(self, account: str, name: str, force: bool) -> dict[str, Any]:
        found = self.repo(account, name)
        if found is None:
            raise core.name_unknown(name)
        has = self.db.execute("SELECT 1 FROM manifests WHERE account=? AND repo=? LIMIT 1",
                              (account, name)).fetchone()
        if has and not force:
            raise RepositoryNotEmpty(name)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("manifests", "refs", "tags", "links"):
                self.db.execute(f"DELETE FROM {table} WHERE account=? AND repo=?", (account, name))
            self.db.execute("DELETE FROM uploads WHERE account=? AND repo=?", (account, name))
            self.db.execute("DELETE FROM repos WHERE account=? AND name=?", (account, name))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return found

    # -- uploads -------------------------------------------------------------------------------
    def upload_start(self, account: str, repo: str, now: int) -> core.UploadSession:
        self.require_repo(account, repo)
        (n,) = self.db.execute("SELECT COUNT(*) FROM uploads WHERE account=?",
                               (account,)).fetchone()
        if n >= self.limits.registry_uploads_per_tenant_max:
            raise RegistryError(429, "TOOMANYREQUESTS",
                                f"at most {self.limits.registry_uploads_per_tenant_max} "
                                "uploads in progress per tenant")
        s = core.UploadSession(str(uuidlib.uuid4()), account, repo, 0, now)
        open(self._upload_path(s.uuid), "wb").close()
        self.db.execute("INSERT INTO uploads VALUES (?, ?, ?, 0, ?)",
                        (s.uuid, account, repo, now))
        self._hashers[s.uuid] = hashlib.sha256()
        return s

    def upload(self, account: str, repo: str, uuid: str) -> core.UploadSession:
        """A session of this tenant and repository; anyone else's is simply unknown."""
        row = self.db.execute(
            "SELECT offset, touched_ms FROM uploads WHERE uuid=? AND account=? AND repo=?",
            (uuid, account, repo)).fetchone()
        if row is None:
            raise core.upload_unknown(uuid)
        return core.UploadSession(uuid, account, repo, row[0], row[1])

    def upload_append(self, s: core.UploadSession, data: bytes, start: int | None,
                      now: int) -> None:
        s.check_append(start, len(data), self.limits)
        with open(self._upload_path(s.uuid), "r+b") as f:
            f.seek(s.offset)
            f.write(data)
            f.truncate()
        h = self._hashers.get(s.uuid)
        if h is not None:
            h.update(data)
        s.appended(len(data), now)
        self.db.execute("UPDATE uploads SET offset=?, touched_ms=? WHERE uuid=?",
                        (s.offset, now, s.uuid))

    def upload_cancel(self, s: core.UploadSession) -> None:
        self._hashers.pop(s.uuid, None)
        self.db.execute("DELETE FROM uploads WHERE uuid=?", (s.uuid,))
        try:
            os.unlink(self._upload_path(s.uuid))
        except FileNotFoundError:
            pass

    def upload_digest(self, s: core.UploadSession) -> str:
        """The sha256 of what was uploaded (the running hash, else the file read again)."""
        h = self._hashers.get(s.uuid)
        if h is None:
            h = hashlib.sha256()
            with open(self._upload_path(s.uuid), "rb") as f:
                while block := f.read(read_block_bytes):
                    h.update(block)
        return "sha256:" + h.hexdigest()

    def upload_commit(self, s: core.UploadSession, digest: str, actual: str, now: int) -> int:
        """Make the upload the blob ``digest`` (it must be ``actual``, the content's); on a
        mismatch nothing is kept. Returns the blob's size."""
        try:
            s.check_commit(digest, actual)
        except RegistryError:
            self.upload_cancel(s)
            raise
        path = self.blob_path(s.account, digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        src = self._upload_path(s.uuid)
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        os.rename(src, path)  # same digest, same bytes: replacing an existing copy is harmless
        self._hashers.pop(s.uuid, None)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM uploads WHERE uuid=?", (s.uuid,))
            self._link(s.account, s.repo, digest, s.offset, now)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return s.offset

    def _link(self, account: str, repo: str, digest: str, size: int, now: int) -> None:
        self.db.execute(
            "INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT (account, digest) "
            "DO UPDATE SET linked_ms=excluded.linked_ms", (account, digest, size, now))
        self.db.execute("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", (account, repo, digest))

    # -- blobs ---------------------------------------------------------------------------------
    def blob_size(self, account: str, repo: str, digest: str) -> int | None:
        """The size of a blob visible in ``repo`` (uploaded or mounted there), else None."""
        core.parse_digest(digest)
        row = self.db.execute(
            "SELECT b.size FROM links l JOIN blobs b ON b.account=l.account AND "
            "b.digest=l.digest WHERE l.account=? AND l.repo=? AND l.digest=?",
            (account, repo, digest)).fetchone()
        return None if row is None else int(row[0])

    def touch(self, account: str, digest: str, now: int) -> None:
        """A client found the blob (HEAD before a push skips its upload): its grace period
        starts again, so it is not collected before the manifest that needs it arrives."""
        self.db.execute("UPDATE blobs SET linked_ms=MAX(linked_ms, ?) WHERE account=? AND "
                        "digest=?", (now, account, digest))

    def blob_read(self, account: str, digest: str, offset: int, length: int) -> bytes:
        length = min(length, self.limits.registry_chunk_bytes_max)
        with open(self.blob_path(account, digest), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def mount(self, account: str, repo: str, from_repo: str, digest: str, now: int) -> int | None:
        """Link a blob of the tenant's ``from_repo`` into ``repo``: its size, or None when the
        tenant has no such blob there (the client then uploads it)."""
        size = self.blob_size(account, from_repo, digest)
        if size is None:
            return None
        self._link(account, repo, digest, size, now)
        return size

    def blob_delete(self, account: str, repo: str, digest: str) -> None:
        if self.blob_size(account, repo, digest) is None:
            raise core.blob_unknown(digest)
        self.db.execute("DELETE FROM links WHERE account=? AND repo=? AND digest=?",
                        (account, repo, digest))

    # -- manifests -----------------------------------------------------------------------------
    def put_manifest(self, account: str, repo: str, ref: str, body: bytes,
                     content_type: str | None) -> core.Manifest:
        self.require_repo(account, repo)
        core.check_reference(ref)
        m = core.parse_manifest(body, content_type, self.limits)
        if ":" in ref and ref != m.digest:
            raise core.digest_invalid(f"manifest digest {m.digest} does not match {ref}")
        names = m.blob_digests() + [d.digest for d in m.manifests]
        have_blob = {d for d in m.blob_digests() if self.blob_size(account, repo, d) is not None}
        have_manifest = {d.digest for d in m.manifests
                         if self._manifest_row(account, repo, d.digest) is not None}
        missing = core.missing_references(m, have_blob, have_manifest)
        if missing:
            raise RegistryError(400, "MANIFEST_BLOB_UNKNOWN",
                                "manifest references a blob or manifest unknown to the "
                                "repository", {"digests": missing[:20]})
        sizes = {d: self.blob_size(account, repo, d) or 0 for d in have_blob}
        core.check_blob_sizes(m, sizes)
        if self._manifest_row(account, repo, m.digest) is None:
            (n,) = self.db.execute("SELECT COUNT(*) FROM manifests WHERE account=? AND repo=?",
                                   (account, repo)).fetchone()
            if n >= self.limits.registry_images_per_repo_max:
                raise RegistryError(403, "DENIED", f"at most "
                                    f"{self.limits.registry_images_per_repo_max} images in "
                                    "a repository")
        image_bytes = sum(d.size for d in m.layers) + (m.config.size if m.config else 0)
        if m.is_index:
            image_bytes = sum(d.size for d in m.manifests)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self._manifest_row(account, repo, m.digest) is None:
                self.db.execute("INSERT INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (account, repo, m.digest, m.media_type, body, image_bytes,
                                 time.time()))
                kind = "manifest" if m.is_index else "blob"
                self.db.executemany("INSERT INTO refs VALUES (?, ?, ?, ?, ?)",
                                    [(account, repo, m.digest, d, kind) for d in names])
            if ":" not in ref:
                self.db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?)",
                                (account, repo, ref, m.digest))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return m

    def has_manifest(self, account: str, repo: str, digest: str) -> bool:
        return self._manifest_row(account, repo, digest) is not None

    def manifest_digests(self, account: str, repo: str) -> set[str]:
        return {str(r[0]) for r in self.db.execute(
            "SELECT digest FROM manifests WHERE account=? AND repo=?", (account, repo))}

    def _manifest_row(self, account: str, repo: str, digest: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.db.execute(
            "SELECT media_type, body FROM manifests WHERE account=? AND repo=? AND digest=?",
            (account, repo, digest)).fetchone()
        return row

    def resolve(self, account: str, repo: str, ref: str) -> str | None:
        """A tag or digest of ``repo`` -> the manifest digest (None: unknown). The hook image
        functions resolve ``<uri>:<tag>`` through."""
        core.check_reference(ref)
        if ":" in ref:
            return ref if self._manifest_row(account, repo, ref) is not None else None
        row = self.db.execute("SELECT digest FROM tags WHERE account=? AND repo=? AND tag=?",
                              (account, repo, ref)).fetchone()
        return None if row is None else str(row[0])

    def get_manifest(self, account: str, repo: str, ref: str) -> tuple[str, str, bytes]:
        """(media type, digest, body) of a manifest by tag or digest."""
        self.require_repo(account, repo)
        digest = self.resolve(account, repo, ref)
        row = None if digest is None else self._manifest_row(account, repo, digest)
        if digest is None or row is None:
            raise core.manifest_unknown(ref)
        return str(row[0]), digest, bytes(row[1])

    def layers(self, account: str, repo: str, digest: str) -> list[core.Descriptor]:
        """The layers of an image manifest, in order (the hook image unpacking reads)."""
        media_type, _, body = self.get_manifest(account, repo, digest)
        return list(core.parse_manifest(body, media_type, self.limits).layers)

    def delete_manifest(self, account: str, repo: str, digest: str) -> list[str]:
        """Delete a manifest by digest and the tags naming it; returns the tags."""
        self.require_repo(account, repo)
        core.parse_digest(digest)
        if self._manifest_row(account, repo, digest) is None:
            raise core.manifest_unknown(digest)
        tags = [r[0] for r in self.db.execute(
            "SELECT tag FROM tags WHERE account=? AND repo=? AND digest=?",
            (account, repo, digest))]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM manifests WHERE account=? AND repo=? AND digest=?",
                            (account, repo, digest))
            self.db.execute("DELETE FROM refs WHERE account=? AND repo=? AND manifest=?",
                            (account, repo, digest))
            self.db.execute("DELETE FROM tags WHERE account=? AND repo=? AND digest=?",
                            (account, repo, digest))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return tags

    def untag(self, account: str, repo: str, tag: str) -> str | None:
        row = self.db.execute("SELECT digest FROM tags WHERE account=? AND repo=? AND tag=?",
                              (account, repo, tag)).fetchone()
        if row is None:
            return None
        self.db.execute("DELETE FROM tags WHERE account=? AND repo=? AND tag=?",
                        (account, repo, tag))
        return str(row[0])

    def tags(self, account: str, repo: str, n: int | None, last: str | None) -> list[str]:
        self.require_repo(account, repo)
        n = min(n if n is not None else self.limits.registry_tags_page_max,
                self.limits.registry_tags_page_max)
        rows = self.db.execute(
            "SELECT tag FROM tags WHERE account=? AND repo=? AND tag>? ORDER BY tag LIMIT ?",
            (account, repo, last or "", n)).fetchall()
        return [r[0] for r in rows]

    def images(self, account: str, repo: str) -> list[ImageRow]:
        self.require_repo(account, repo)
        rows = self.db.execute(
            "SELECT digest, media_type, image_bytes, pushed_s FROM manifests "
            "WHERE account=? AND repo=? ORDER BY pushed_s", (account, repo)).fetchall()
        out = []
        for digest, mt, size, pushed in rows:
            tags = [r[0] for r in self.db.execute(
                "SELECT tag FROM tags WHERE account=? AND repo=? AND digest=? ORDER BY tag",
                (account, repo, digest))]
            out.append(ImageRow(digest, mt, tags, int(size), float(pushed)))
        return out

    # -- collection ----------------------------------------------------------------------------
    def collect(self, now: int, keep: Callable[[str], set[str]] | None = None
                ) -> dict[str, int]:
        """Delete unreferenced blobs past their grace period and idle upload sessions.
        ``keep(account)``: blobs held from outside the registry (the layers the tenant's image
        functions name: frontend/image_functions.held_layers), asked only for a tenant with
        blobs to collect."""
        blobs = kept = 0
        for (account,) in self.db.execute("SELECT DISTINCT account FROM blobs").fetchall():
            rows = self.db.execute(
                "SELECT b.digest, b.linked_ms, (SELECT COUNT(*) FROM refs r WHERE "
                "r.account=b.account AND r.child=b.digest AND r.kind='blob') FROM blobs b "
                "WHERE b.account=?", (account,)).fetchall()
            states = [core.BlobState(d, int(n), int(t)) for d, t, n in rows]
            doomed = core.collectable(states, now, self.limits)
            held = keep(account) if doomed and keep is not None else set()
            kept += sum(1 for d in doomed if d in held)
            for digest in (d for d in doomed if d not in held):
                self.db.execute("DELETE FROM blobs WHERE account=? AND digest=?",
                                (account, digest))
                self.db.execute("DELETE FROM links WHERE account=? AND digest=?",
                                (account, digest))
                try:
                    os.unlink(self.blob_path(account, digest))
                except FileNotFoundError:
                    pass
                blobs += 1
        uploads = 0
        for uuid, account, repo, offset, touched in self.db.execute(
                "SELECT uuid, account, repo, offset, touched_ms FROM uploads").fetchall():
            s = core.UploadSession(uuid, account, repo, offset, touched)
            if s.expired(now, self.limits):
                self.upload_cancel(s)
                uploads += 1
        return {"blobs_deleted": blobs, "uploads_expired": uploads, "blobs_held": kept}

    def statistics(self) -> dict[str, int]:
        (blobs, size) = self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs"
                                        ).fetchone()
        (uploads,) = self.db.execute("SELECT COUNT(*) FROM uploads").fetchone()
        return {"blobs": int(blobs), "blob_bytes": int(size), "uploads": int(uploads)}

    def close(self) -> None:
        self.db.close()
