"""The user-facing errors: each is printed as one line that names the bad option, file or checkpoint.

They live here, below every other module, so that any module can raise them without importing the one that
happens to catch them (``harness.run`` prints them and exits with status 2).
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "HarnessError", "ModelNotFoundError"]


class ConfigError(ValueError):
    """A component or experiment option is invalid. The message names the option."""


class DataError(ValueError):
    """Input data is unusable. The message names the offending file (full path) and says what to do."""


class ModelNotFoundError(FileNotFoundError):
    """A configured checkpoint is missing. The message says where the harness looked and how to fix it."""


class HarnessError(RuntimeError):
    """A user-facing error (bad option, bad input file, missing checkpoint): printed as one line."""
