# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tiny test models run several times faster on one thread than with intra-op threads competing for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    """A tiny random SD3 pipeline saved to disk, so tests load it through `DiffusionPipeline.from_pretrained`."""
    from tiny_models import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(path)
    return str(path)
