"""Triton helper shared by the update kernels: which tensor and which elements this program owns."""

import triton
import triton.language as tl


@triton.jit
def locate_chunk(table_ptr, num_tensors, flags_ptr, HAS_FLAGS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Return (address, state_off, grad_off, step_index, offsets, numel, full) for program_id(0)'s chunk.

    Binary search over the chunk-start row (row 4) of the [6, T] table built by table.build_tensor_table:
    log2(T) scalar loads from one small row that stays in L1/L2. ``full`` is True when the whole chunk lies
    inside its tensor: kernels then load and store without a mask, which keeps the accesses 16 bytes wide
    (a mask against a loaded, unaligned numel would force 4-byte accesses). With HAS_FLAGS, flags =
    [clip coefficient, skip]: skip != 0 (non-finite gradients) makes numel 0, so nothing is loaded or stored.
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
        # compiler lets it emit 128-bit loads/stores.
        addr = tl.multiple_of(addr, 16)
        state_off = tl.multiple_of(state_off, 64)
        grad_off = tl.multiple_of(grad_off, 64)
    if HAS_FLAGS:
        numel = tl.where(tl.load(flags_ptr + 1) == 0, numel, 0)
    start = (chunk - first) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= numel
    return addr, state_off, grad_off, step_index, offsets, numel, full


@triton.jit
def to_pointer(addr, like_ptr, ALIGNED: tl.constexpr):
    """The parameter address from the table as a pointer of ``like_ptr``'s element type.

    The alignment hint must sit on the pointer: a hint on the integer does not survive the cast, and without
    it every parameter access is a 4-byte load (seen in the sm_90 PTX)."""
    ptr = addr.to(tl.pointer_type(like_ptr.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load_weight(p_ptrs, w_ptrs, mask, MASTER: tl.constexpr):
    """The fp32 weight an update starts from: the parameter itself, or under mixed precision its fp32 master,
    unless the model's copy was changed since the last update (it is no longer the rounded master): then the
    user's weight wins."""
    if MASTER:
        w = tl.load(w_ptrs, mask=mask)
        cur = tl.load(p_ptrs, mask=mask)
        p = tl.where(cur != w.to(p_ptrs.dtype.element_ty), cur.to(tl.float32), w)
    else:
        p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    return p


@triton.jit
def store_weight(p_ptrs, w_ptrs, p, mask, MASTER: tl.constexpr):
    """Write the updated fp32 weight: the master (mixed precision) and the model's copy in its own dtype."""
    if MASTER:
        tl.store(w_ptrs, p, mask=mask)
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def round_stochastic(x, bits):
    """fp32 -> bf16 rounded up or down at random, with the chance of rounding up equal to where ``x`` lies
    between its two bf16 neighbours: add 16 random bits below the bf16 mantissa, then cut them off (the
    result is exactly a bf16, so the last cast is exact). Unbiased: E[result] = x. inf and NaN stay so."""
    kept = ((x.to(tl.uint32, bitcast=True) + (bits >> 16)) >> 16) << 16
    return kept.to(tl.float32, bitcast=True).to(tl.bfloat16)
