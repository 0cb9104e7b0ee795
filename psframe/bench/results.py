"""Results files: one JSON record per line, appended whole, read back past a torn last line."""
import json
import os

from ..metrics import jsonable

__all__ = ["append", "read", "latest"]


def append(path, record):
    """Append ``record`` as one line with a single write, then fsync: a reader (or a resumed
    grid) sees each record whole or not at all."""
    data = (json.dumps(jsonable(record), allow_nan=False) + "\n").encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        # A run killed mid-write leaves a line without its newline: start on a fresh line,
        # so only that torn record is lost, not this one too.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path):
    """(records, lines that were not JSON objects): a torn line is skipped, never fatal."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


def latest(records, kind="run"):
    """{key: the last record of ``kind`` with that key}: a re-run replaces an older record."""
    out = {}
    for r in records:
        if r.get("kind") == kind and "key" in r:
            out[r["key"]] = r
    return out
