"""The fixtures of the libvirt test-driver tier (tests/virt.py), offered to integration tests."""

import pytest

# Before any import of them: their asserts explain their failures (test_qemu.py and
# test_inventory.py both import qemu).
pytest.register_assert_rewrite("virt", "qemu")

from virt import lab, make_lab  # noqa: E402, F401
