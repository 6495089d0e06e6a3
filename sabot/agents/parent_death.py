"""Ask Linux to signal a process when its parent exits (``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import functools
import os
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def prepare() -> None:
    """Load libc now, so that a child between fork and exec does not have to."""
    if sys.platform.startswith("linux"):
        _libc()


def set_parent_death_signal(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent thread exits.

    Returns False, and does nothing, on systems other than Linux. The
    setting survives exec. It fires when the thread that forked this
    process exits, which for the callers here is the parent's only thread.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    if _libc().prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
    return True
