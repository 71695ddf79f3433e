"""The data cache folder (`<data root>/.cache`): derived files that later runs may reuse, never trust blindly.

Every cached file is written whole or not at all (`perceiver.files`), and read back only after checks that say it
belongs to the data asked for. A folder that cannot be written (a read-only data root, a full disk) costs only
the recomputation next time: training goes on without the cache, and the run says so once, not once per file.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from perceiver.files import write_atomic, write_text_atomic

log = logging.getLogger(__name__)

_unwritable: set[str] = set()  # cache folders this process has already warned about


def checksum(data: Any, chunk: int = 1 << 26) -> str:
    """CRC-32 of a buffer (bytes, a NumPy array or memmap), in chunks so a memmap is read once, not copied."""
    view = memoryview(data).cast("B")
    crc = 0
    for start in range(0, len(view), chunk):
        crc = zlib.crc32(view[start : start + chunk], crc)
    return f"{crc:08x}"


class CacheDir:
    """A folder for cache files that may turn out to be unwritable: the first failed write warns (once per folder
    and process) and turns writing off; reads still work, so a read-only cache filled earlier is still used."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(os.path.expanduser(str(path))) if path is not None else None
        self.writable = self.path is not None and str(self.path) not in _unwritable

    def file(self, name: str) -> Path | None:
        return self.path / name if self.path is not None else None

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON object in `name`, or None when it is absent or unreadable (the caller recomputes)."""
        path = self.file(name)
        if path is None or not path.is_file():
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("cache file %s is unreadable: it is rebuilt", path)
            return None
        return value if isinstance(value, dict) else None

    def write_json(self, name: str, value: dict[str, Any]) -> bool:
        return self.write(name, lambda path: write_text_atomic(path, json.dumps(value)))

    def write_bytes(self, name: str, write: Callable[[IO[bytes]], object]) -> bool:
        return self.write(name, lambda path: write_atomic(path, write))

    def write(self, name: str, write: Callable[[Path], object]) -> bool:
        """`write(path)` for the file `name`; False (and writing off) when the folder cannot take it."""
        if not self.writable or self.path is None:
            return False
        try:
            write(self.path / name)
        except OSError as error:
            self.disable(error)
            return False
        return True

    def disable(self, error: OSError) -> None:
        """Stop writing here; the first time in this process, say why and what it costs."""
        self.writable = False
        if str(self.path) in _unwritable:
            return
        _unwritable.add(str(self.path))
        log.warning(
            "data cache %s cannot be written (%s): training goes on without caching; the data is prepared "
            "again next run. Point paths.cache_dir (by default below paths.data_root or PERCEIVER_DATA_ROOT) at a "
            "writable folder to cache it",
            self.path,
            error.strerror or error,
        )
