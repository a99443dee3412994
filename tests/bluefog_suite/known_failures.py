"""The one list of BlueFog tests that are not run against decomm.compat.bluefog, and why.

Keys are ``file::Class::test`` (``file::test`` for module-level tests; a parametrized
test is listed by its base name). ``nps`` is the set of MPI sizes where it is known to
fail (``None``: all). conftest.py marks these ``xfail(run=False)``: a test that fails on
some ranks only would leave the others waiting in a collective, so none is run.
"""

from __future__ import annotations

# test id -> (MPI sizes, reason)
KNOWN_FAILURES: dict[str, tuple[set[int] | None, str]] = {
}
