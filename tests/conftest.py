"""Where no CUDA device exists, Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET is
read when a kernel is defined, so it is set before any test imports emcaps)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
