"""Checks of a local data set copy: layout (folders and files), counts and file-list hashes.

Used by the scenario builders (every ``cl train``) and by ``cl data check``. Expectations live in
``scenarios/splits/<dataset>.json``: where the data comes from, the expected layout, and per split the expected
number of images and classes and the sha256 of the file list (``"relative/path<TAB>label\\n"`` lines in order).
Where a hash cannot be known without the data (a derived split of a data set we could not download), it is
``null``: the first check records the hash in ``<data set folder>/.cl_filelists.json`` and reports the split as
*unverified*; every later check compares against that record, so a copy that changed is detected.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl.errors import DataError

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
RECORD_NAME = ".cl_filelists.json"
VERIFY_MODES = ("full", "layout")


def load_spec(dataset: str) -> dict[str, Any]:
    """The expectations of one data set (``scenarios/splits/<dataset>.json``)."""
    path = SPLITS_DIR / f"{dataset}.json"
    if not path.is_file():
        raise DataError(f"no split description '{path}' for data set '{dataset}'")
    return json.loads(path.read_text())


def where_to_get(spec: dict[str, Any]) -> str:
    return f"get {spec['title']} from {spec['source']} (expected layout in docs/data.md)"


def data_root(root: str | os.PathLike) -> Path:
    """``data.root``; the environment variable ``CL_DATA_ROOT`` replaces the default value ``data``."""
    if str(root) == "data" and os.environ.get("CL_DATA_ROOT"):
        return Path(os.environ["CL_DATA_ROOT"])
    return Path(root)


def require_dir(path: Path, what: str, spec: dict[str, Any]) -> Path:
    if not path.is_dir():
        raise DataError(f"{spec['title']}: missing folder '{path}' ({what}); {where_to_get(spec)}")
    return path


def require_file(path: Path, what: str, spec: dict[str, Any]) -> Path:
    if not path.is_file():
        raise DataError(f"{spec['title']}: missing file '{path}' ({what}); {where_to_get(spec)}")
    return path


def file_list_hash(items: Sequence[tuple[str, int]]) -> str:
    """sha256 over ``path<TAB>label`` lines in stream order (paths relative to the data set folder, '/')."""
    h = hashlib.sha256()
    for path, label in items:
        h.update(f"{path}\t{int(label)}\n".encode())
    return h.hexdigest()


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class SplitReport:
    """The result of checking one split: ``status`` is ``ok``, ``unverified`` (hash recorded) or ``layout``."""

    split: str
    count: int
    classes: int
    sha256: str
    status: str
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        size = f"{self.count} images, {self.classes} classes, " if self.count else ""
        return f"{self.split}: {size}sha256 {self.sha256[:16]}… {self.status}{extra}"


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _read_record(folder: Path) -> dict[str, Any]:
    path = folder / RECORD_NAME
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_record(folder: Path, key: str, digest: str, count: int) -> bool:
    """Record a hash next to the data (rank 0 only; a read-only copy is simply left unrecorded)."""
    if not _is_rank_zero():
        return False
    record = _read_record(folder)
    record[key] = {"sha256": digest, "count": count}
    try:
        tmp = folder / f"{RECORD_NAME}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        tmp.replace(folder / RECORD_NAME)
        return True
    except OSError:
        return False


def verify_split(spec: dict[str, Any], key: str, items: Sequence[tuple[str, int]], folder: Path,
                 mode: str = "full") -> SplitReport:
    """Check one split's file list against the repository's expectations and the local record.

    Args:
        spec: the data set's JSON description.
        key: the split's name in ``spec["splits"]`` (e.g. ``l2p/train``).
        items: (relative path, original label) pairs in the order the builder uses.
        folder: the data set folder (where the local record lives).
        mode: ``full`` checks counts and hashes; ``layout`` (reduced copies) only records and compares hashes.

    Raises:
        DataError: a count or hash differs from what is expected or recorded; the message names the split, the
            numbers and what to do.
    """
    if mode not in VERIFY_MODES:
        raise DataError(f"unknown verify mode '{mode}' (choose one of {', '.join(VERIFY_MODES)})")
    title = spec["title"]
    expected = spec.get("splits", {}).get(key, {})
    digest = file_list_hash(items)
    count, n_classes = len(items), len({int(label) for _, label in items})
    notes: list[str] = []
    if not items:
        raise DataError(f"{title}: split '{key}' under '{folder}' has no images; {where_to_get(spec)}")
    if mode == "full":
        for what, want, have in (("images", expected.get("count"), count),
                                 ("classes", expected.get("classes"), n_classes)):
            if want is not None and int(want) != have:
                raise DataError(
                    f"{title}: split '{key}' under '{folder}' has {have} {what}, expected {want}; the copy is "
                    f"incomplete or a different version ({where_to_get(spec)}); for a deliberately reduced copy "
                    "set scenario.verify=layout"
                )
        want_hash = expected.get("sha256")
        if want_hash:
            if want_hash != digest:
                raise DataError(
                    f"{title}: the file list of split '{key}' under '{folder}' differs from the official one "
                    f"(sha256 {digest[:16]}… != {want_hash[:16]}…); `cl data check` shows the details"
                )
            return SplitReport(key, count, n_classes, digest, "ok")
    record = _read_record(folder).get(key)
    if record is not None:
        if record.get("sha256") != digest:
            raise DataError(
                f"{title}: the file list of split '{key}' under '{folder}' changed since it was first recorded "
                f"({record.get('count')} -> {count} images, sha256 {record.get('sha256', '')[:16]}… -> "
                f"{digest[:16]}…); restore the files, or delete '{folder / RECORD_NAME}' to accept the new copy"
            )
        notes.append(f"matches the hash recorded in {folder / RECORD_NAME}")
    else:
        recorded = _write_record(folder, key, digest, count)
        notes.append(f"hash recorded in {folder / RECORD_NAME}" if recorded else "hash not recorded (read-only)")
    status = "unverified" if mode == "full" else "layout only"
    return SplitReport(key, count, n_classes, digest, status, notes)


def verify_total(spec: dict[str, Any], items: Sequence[tuple[str, int]], folder: Path, mode: str = "full",
                 what: str = "") -> None:
    """Check the whole copy's image and class counts (``spec["images"]``, ``spec["classes"]``) in ``full`` mode."""
    if mode != "full":
        return
    n_classes = len({int(label) for _, label in items})
    where = f"'{folder}'" + (f" ({what})" if what else "")
    for noun, want, have in (("images", spec.get("images"), len(items)), ("classes", spec.get("classes"), n_classes)):
        if want is not None and int(want) != have:
            raise DataError(
                f"{spec['title']}: {where} has {have} {noun}, expected {want}; the copy is incomplete or a "
                f"different version ({where_to_get(spec)}); for a deliberately reduced copy set scenario.verify=layout"
            )
