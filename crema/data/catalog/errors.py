"""The catalog's errors: a dataset that is not there, and a full disk (however deep it is wrapped)."""

from __future__ import annotations

import errno


from crema.config import ConfigError



class DiskFull(OSError):
    """No space left where the dataset is written."""


class DatasetNotFound(ConfigError):
    """The URI holds no CREMA dataset (no catalog, or no tables in it)."""



def is_disk_full(err: BaseException) -> bool:
    """Whether an error (or what caused it, also inside a Ray task error) is a full disk."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err) or "ENOSPC" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
