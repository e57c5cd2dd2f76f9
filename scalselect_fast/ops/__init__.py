"""Kernels used by extraction: each ``<op>.py`` holds the Triton kernel(s), the torch path and the
host dispatcher. Importing this package needs torch (not Triton: it is imported when first used).
"""
from .instruction_attended_pool import instruction_attended_pool, instruction_column_attention

__all__ = ["instruction_attended_pool", "instruction_column_attention"]
