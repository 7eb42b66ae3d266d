"""Fixtures of the architecture tests; the mechanics they share are in harness.py."""

from __future__ import annotations

import pytest
import torch

import voxtune


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Each module here runs on one intra-op thread (restored after it): the models are tiny
    (hidden sizes 32-64), a second thread buys nothing on tensors this small, and when another
    process keeps the cores busy every parallel op waits for a descheduled OpenMP thread. On
    2 cores beside a 2-thread torch job the folder took 185 s with 2 threads, 33 s with one
    (quiet: about 21 s either way)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(checkpoint):
    """The module's `checkpoint` as voxtune reads it, for the tests that leave it as it is."""
    return voxtune.load(str(checkpoint))
