"""The benchmark report tests' import of :mod:`tests.helpers.jobs` (its new home)."""

from tests.helpers.jobs import REPO, job  # noqa: F401
