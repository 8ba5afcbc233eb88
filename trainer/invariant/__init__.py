"""The batch-invariant mode's forward: operators and attention whose results, row by row, do not
depend on the batch they are computed in (`ops`, `attention`)."""

from .attention import FIXED_BLOCKS, block_attention, fixed_block_attention
from .ops import batch_invariant_ops, flat_chunks, row_blocks, stock_ops

__all__ = ["FIXED_BLOCKS", "block_attention", "fixed_block_attention", "batch_invariant_ops", "flat_chunks",
           "row_blocks", "stock_ops"]
