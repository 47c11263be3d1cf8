"""Test-wide guards.

DeepSpeed's CPU shared-memory allreduce leaves a 66 MB file per rank in ``/dev/shm`` after every run; the
fixture below removes the files of the ports this test got from ``dist.free_port()`` (the launcher runs and
``run_distributed``), so that a suite run does not fill the machine's RAM (``tests/dist.py``).
"""

from __future__ import annotations

import pytest
from dist import remove_shm_buffers


@pytest.fixture(autouse=True)
def _remove_deepspeed_shm_buffers():
    yield
    remove_shm_buffers()
