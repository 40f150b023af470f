"""Matrix FLOPs of a FLUX-style transformer step, counted the same way for every implementation.

A double-stream block (per-stream QKV ``3D^2``, output ``D^2`` and MLP ``8D^2`` per token) and a
single-stream block (fused QKV and MLP-in ``7D^2``, output ``5D^2`` per token) both make
``24 * N * D^2`` projection FLOPs plus ``4 * N^2 * D`` for attention over ``N`` joint tokens.
Embedders, modulation and the final layer are left out (under 1% at FLUX size); so are
element-wise operations, which is what "matrix FLOPs" means in the peer table.
"""


def block_flops(width: int, tokens: int, batch: int = 1) -> float:
    """Matrix FLOPs of one FLUX block (double- or single-stream) on ``tokens`` joint tokens."""
    return batch * (24.0 * tokens * width**2 + 4.0 * tokens**2 * width)


def flux_step_flops(width: int, tokens: int, blocks: int, batch: int = 1) -> float:
    """Matrix FLOPs of ``blocks`` FLUX blocks for one model evaluation."""
    return blocks * block_flops(width, tokens, batch)
