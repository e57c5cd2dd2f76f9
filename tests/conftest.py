"""Suite-wide test setup.

Triton picks interpreter or compiled mode when a kernel is decorated, so the choice has to be made
before any test module imports a kernel: without a CUDA device, kernels run under the (exact, slow)
Triton interpreter on CPU tensors.
"""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # core tests run without torch
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
