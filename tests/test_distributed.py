"""Two gloo processes with a global batch of 2B = one process with batch 2B (ITM negatives fixed)."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(dist_worker.run_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    dist = torch.load(out, weights_only=True)
    single = dist_worker.run_single()
    # ITC, ITM, ITG: the mean over ranks of per-rank means equals the global mean (equal shards)
    torch.testing.assert_close(dist["losses"], single["losses"], atol=1e-5, rtol=1e-5)
    assert dist["grads"].keys() == single["grads"].keys()
    for name, g in single["grads"].items():
        torch.testing.assert_close(dist["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")


@pytest.mark.slow
def test_stage2_with_the_llm_sharded_equals_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(dist_worker.run_rank_fsdp, args=(2, free_port(), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    single = dist_worker.run_single_stage2()
    torch.testing.assert_close(sharded["loss"], single["loss"], atol=1e-5, rtol=1e-5)
    for name, g in single["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")
