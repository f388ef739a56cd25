"""The fixtures of the libvirt test-driver tier (tests/virt.py), offered to integration tests."""

import pytest

pytest.register_assert_rewrite("virt")  # before the import: its asserts explain their failures

from virt import lab, make_lab  # noqa: E402, F401
