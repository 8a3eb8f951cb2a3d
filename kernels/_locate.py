"""Triton helper shared by the update kernels: which tensor and which elements this program owns."""

import triton
import triton.language as tl


@triton.jit
def locate_chunk(table_ptr, num_tensors, flags_ptr, HAS_FLAGS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Return (address, state_off, grad_off, step_index, offsets, mask) for program_id(0)'s chunk.

    With HAS_FLAGS, flags = [clip coefficient, skip]: skip != 0 (non-finite gradients) empties the mask, so
    parameters and state stay untouched and nothing is even loaded.

    Binary search over the chunk-start row (row 4) of the [6, T] table built by table.build_tensor_table;
    log2(T) scalar loads, all from one small row that stays in L1/L2.
    """
    chunk = tl.program_id(0).to(tl.int64)
    starts = table_ptr + 4 * num_tensors
    lo = num_tensors * 0
    hi = num_tensors - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(starts + mid) <= chunk
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    addr = tl.load(table_ptr + lo)
    numel = tl.load(table_ptr + num_tensors + lo)
    state_off = tl.load(table_ptr + 2 * num_tensors + lo)
    grad_off = tl.load(table_ptr + 3 * num_tensors + lo)
    first = tl.load(starts + lo)
    step_index = tl.load(table_ptr + 5 * num_tensors + lo)
    if ALIGNED:
        # The launcher checked: addresses 16-byte aligned, offsets multiples of 64 elements. Telling the
        # compiler lets it emit 128-bit loads/stores; without it every access is scalar.
        addr = tl.multiple_of(addr, 16)
        state_off = tl.multiple_of(state_off, 64)
        grad_off = tl.multiple_of(grad_off, 64)
    if HAS_FLAGS:
        numel = tl.where(tl.load(flags_ptr + 1) == 0, numel, 0)
    offsets = (chunk - first) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    return addr, state_off, grad_off, step_index, offsets, mask
