"""One import point for :mod:`audioop`.

Python 3.11/3.12 ship ``audioop`` in the standard library but warn that it is
deprecated; 3.13 removed it and the ``audioop-lts`` package installs a
drop-in module under the same name.  Both are C and fast, which is why the
media layer keeps using them for G.711 and level work.

Usage: ``from activecall.media._audioop import audioop``.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # Only the import warns; silence it here, once, for the whole daemon.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["audioop"]
