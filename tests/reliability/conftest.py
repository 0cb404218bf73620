"""Fixtures the drills share with the unit tests."""

from tests.unit.test_pairs import bin_images  # noqa: F401 - a fixture, registered here
