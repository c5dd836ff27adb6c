"""A wall clock that a test can step: imported at start-up by a daemon process whose PYTHONPATH
holds this folder. ``time.time()`` returns the real time plus the seconds written in the file
named by ``FAKE_WALL_OFFSET_FILE`` (re-read at most every 50 ms); the monotonic clock is untouched,
as on a real machine whose clock is stepped."""

import os
import time

_path = os.environ.get("FAKE_WALL_OFFSET_FILE")
if _path:
    _real_time, _monotonic = time.time, time.monotonic
    _cache = {"at": -1.0, "offset": 0.0}

    def _offset() -> float:
        now = _monotonic()
        if now - _cache["at"] > 0.05:
            _cache["at"] = now
            try:
                with open(_path) as f:
                    _cache["offset"] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
        return _cache["offset"]

    time.time = lambda: _real_time() + _offset()
