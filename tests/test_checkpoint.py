"""lis/checkpoint.py: the RNG states a checkpoint carries (exact resume itself: tests/test_resume.py)."""

import torch

from lis.checkpoint import rng_state, set_rng_state


def test_the_cuda_rng_state_is_this_processs_gpu_only(monkeypatch):
    """A checkpoint of an 8-GPU host resumed on a 2-GPU one, or read by every process under torchrun, must
    touch only the current GPU. CUDA is faked: the calls are recorded, the all-GPU ones fail the test."""
    calls = []

    def every_gpu(*args, **kw):
        raise AssertionError("the RNG state of every visible GPU is saved or restored")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))

    state = rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    cpu = torch.get_rng_state()
    torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), cpu)  # the CPU generator is set back as well
    assert len(calls) == 1 and torch.equal(calls[0][0], state["cuda"]) and calls[0][1] == "cuda"  # the current GPU
