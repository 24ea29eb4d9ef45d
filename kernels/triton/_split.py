"""Split-K pieces shared by the Triton kernels whose programs each compute part of a sum
(conv2d's weight gradient, the recurrent layers' backward step): the last program to arrive
at an output tile adds the others' partial results, so no program waits for another.

- `arrive_last`: count a program's arrival at its output tile; True for the last one, which
  resets the counter (the counters are zero between launches: pydl._launch.arrival_counters).
- `sum_partials`: the partials of one output tile, summed in split order (deterministic,
  whichever program arrives last).

Ordering: each program stores its partial, a CTA barrier makes every thread's stores happen
before the arrival, and the arrival is an acq_rel RMW at GPU scope (run by one thread), so the
last arrival synchronises with every earlier one; its loads then read the partials from L2
(.cg): another multiprocessor wrote them, and this one's L1 may hold older copies of the same
lines (a buffer reused every step or launch).
"""
import triton
import triton.language as tl


@triton.jit
def arrive_last(counter_ptr, n):
    """Count this program's arrival at `counter_ptr` (int32); True for the n-th arrival, which
    resets the counter to zero. Call with this program's partial stored; the last one then
    reads the others' with `sum_partials`."""
    tl.debug_barrier()                      # every thread's partial is stored
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == n - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()                      # every thread's loads after the acquire
    return last


@triton.jit
def sum_partials(parts, SPLIT, step, IN_FLIGHT: tl.constexpr):
    """The sum over s = 0 .. SPLIT - 1, in that order, of the fp32 tiles at parts + s * step,
    IN_FLIGHT of them loaded before any of these is added (IN_FLIGHT L2 round trips in flight,
    not one, at IN_FLIGHT tiles of registers: conv2d's 64 x 64 weight-gradient tiles take 2,
    four took 84 more registers a thread in its sm_90 compile; the recurrent layers' small
    tiles take all). The loads bypass L1 (.cg): other multiprocessors wrote them."""
    total = tl.zeros(parts.shape, tl.float32)
    for s0 in range(0, SPLIT, IN_FLIGHT):
        for j in tl.static_range(IN_FLIGHT):
            if j == 0:
                p = tl.load(parts + s0 * step, cache_modifier=".cg")
            else:
                p = tl.load(parts + (s0 + j) * step, mask=s0 + j < SPLIT, other=0.0,
                            cache_modifier=".cg")
            total = total + p
    return total
