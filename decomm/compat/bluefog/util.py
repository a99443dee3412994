"""The helpers of ``bluefog.common.util`` that BlueFog programs and tests import."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["env"]


@contextlib.contextmanager
def env(**kwargs: str) -> Iterator[None]:
    """Set environment variables for the block and restore the previous values after
    (``with env(BLUEFOG_TIMELINE="tl"): bf.init()``)."""
    saved = {k: os.environ.get(k) for k in kwargs}
    os.environ.update({k: str(v) for k, v in kwargs.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
