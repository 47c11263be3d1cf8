"""The multi-process launcher helper (``tests/dist.py``): DeepSpeed's shared-memory files do not outlive a run."""

from __future__ import annotations

import glob
import os

import pytest

pytest.importorskip("deepspeed")

from dist import SHM_PATTERN, free_port, remove_shm_buffers, run_distributed, used_ports  # noqa: E402


def _init_deepspeed(rank: int, world: int) -> list[str]:
    """DeepSpeed's CPU backend: its init creates this rank's ``/dev/shm`` allreduce buffer (when ``LOCAL_SIZE``,
    set by the ``deepspeed`` launcher, says every rank is on this machine)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    t = torch.ones(4)
    deepspeed.comm.all_reduce(t)
    return glob.glob(SHM_PATTERN.format(uid=os.getuid(), port=os.environ["MASTER_PORT"]))


def test_run_distributed_removes_deepspeed_shm_buffers():
    seen = run_distributed(_init_deepspeed, 2, env={"DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "2"}, timeout=300)
    files = sorted(set(seen[0]) | set(seen[1]))
    if not files:
        pytest.skip("this DeepSpeed build's CPU backend made no shared-memory buffer")
    port = files[0].rsplit("_", 2)[-2]
    assert len(files) == 2 and all(f"_{port}_" in f for f in files), files
    assert not [f for f in files if os.path.exists(f)], "the run's /dev/shm buffers are still there"
    assert int(port) not in used_ports()


def test_remove_shm_buffers_touches_only_the_ports_handed_out(tmp_path):
    port = free_port()
    other = port + 1 if port < 65535 else port - 1
    ours = SHM_PATTERN.format(uid=os.getuid(), port=port).replace("*", "127.0.0.1", 1).replace("*", "0")
    theirs = SHM_PATTERN.format(uid=os.getuid(), port=other).replace("*", "127.0.0.1", 1).replace("*", "0")
    if glob.glob(SHM_PATTERN.format(uid=os.getuid(), port=other)):
        pytest.skip(f"port {other} has live files of another job")
    for path in (ours, theirs):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        assert remove_shm_buffers() == [ours] or ours in remove_shm_buffers([port])
        assert not os.path.exists(ours) and os.path.exists(theirs)
        assert port not in used_ports()
    finally:
        for path in (ours, theirs):
            if os.path.exists(path):
                os.unlink(path)
