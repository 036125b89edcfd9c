"""megatron-core's model-parallel CUDA RNG tracker survives a checkpoint round trip.

pytest tests/gpu            # skipped without CUDA
"""

from __future__ import annotations

import io

import pytest
import torch
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
)

from train.run_setup import rng_state, set_rng_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_tracker_draws_repeat_after_restoring_a_saved_state():
    model_parallel_cuda_manual_seed(7, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        torch.rand(8, device="cuda")  # move the model-parallel state off its seed
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)  # as a checkpoint does
    with tracker.fork():
        first = torch.rand(8, device="cuda")
    default_first = torch.rand(8, device="cuda")

    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=False))
    with tracker.fork():
        again = torch.rand(8, device="cuda")
    assert torch.equal(first, again)
    assert torch.equal(default_first, torch.rand(8, device="cuda"))
    tracker.reset()
