"""`device`: the decorator of the Numba kernels' helper functions.

Compiled (on a GPU, and whenever Numba is not simulating), `device(fn)` is
`cuda.jit(device=True, inline="always")(fn)`: Numba inlines the helper's IR at every call site
before optimisation, so a kernel compiles as if the helper's body were written in it (a helper
left to NVVM's inliner can change the kernel's code: other unrolling, more registers).

In the CUDA simulator (PYDL_INTERPRET=1) each call of a `cuda.jit` device function swaps its
module's `cuda` global for the simulator's, under locks, so that `cuda.threadIdx` and the like
resolve: tens of microseconds a call, as much as a short loop of arithmetic. A helper that
never names `cuda` has nothing to swap, so there `device` returns the plain function, called at
Python's cost, and factoring a kernel into helpers does not slow the emulated tests. A helper
that names `cuda` (thread indices, local arrays) gets the `cuda.jit` device function there too.
"""
from numba import config, cuda


def device(fn):
    """An inlined Numba CUDA device function; fn itself in the simulator if it never names
    `cuda`."""
    if config.ENABLE_CUDASIM and "cuda" not in fn.__code__.co_names:
        return fn
    return cuda.jit(device=True, inline="always")(fn)


if config.ENABLE_CUDASIM:
    def trap(message):
        """The simulator's counterpart of the GPU's trap: the kernel's launch raises
        IndexError(message)."""
        raise IndexError(message)
else:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    @intrinsic
    def trap(typingctx, message):
        """Abort the kernel (PTX `trap`), as torch's device-side assert does: the launch fails
        and the process's CUDA context is lost, reported at the next synchronisation.
        `message` (a string literal) is what the simulator raises."""
        def codegen(context, builder, signature, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "trap;", "", side_effect=True)
            builder.call(asm, ())
            return context.get_dummy_value()
        return types.void(message), codegen
