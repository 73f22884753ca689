"""Lookups in a small table a Triton program holds: one helper shared by the kernels that decode or
search code tables. Imports triton only."""

import triton
import triton.language as tl


@triton.jit
def gather(table, idx):
    """table[idx] for a 1-D table held by the program (tl.gather, through shared memory), idx of any
    shape: the result keeps idx's layout, where a load indexed by data would get one of its own (and
    Triton would convert the whole tile through shared memory to match it)."""
    return tl.reshape(tl.gather(table, tl.reshape(idx, [idx.numel]), 0), idx.shape)
