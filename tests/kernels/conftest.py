"""Decode-kernel tests run through Triton's CPU interpreter when there is no GPU: the switch must
be set before triton.jit decorates the kernels, i.e. before any attnlab.kernels module with kernels is
imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
