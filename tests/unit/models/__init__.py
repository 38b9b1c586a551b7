"""Unit tests of the ``models`` package."""
