"""Hand memory the process has freed back to the operating system.

glibc's allocator keeps freed blocks for reuse: after a burst of requests (the server's
caches) or after replacing every weight of a model (quantizing it), the resident memory
would stay at its high-water mark although nothing holds it. ``malloc_trim`` returns the
free pages.
"""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Return freed heap pages to the system (a no-op where the C library is not glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
