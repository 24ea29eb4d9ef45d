"""Grid-stride indexing shared by the 1-D Numba kernels.

pydl launches these kernels with one thread per element on a GPU and with a single block in
the CUDA simulator (pydl._numba_launch.numba_blocks); a grid-stride loop
`for i in range(thread_index(), n, grid_threads())` covers every element either way.
"""
from numba import cuda, int64


@cuda.jit(device=True)
def thread_index():
    """This thread's flat index over a 1-D grid, in int64."""
    return int64(cuda.blockIdx.x) * int64(cuda.blockDim.x) + int64(cuda.threadIdx.x)


@cuda.jit(device=True)
def grid_threads():
    """Number of threads in a 1-D grid, in int64: the step of the grid-stride loops."""
    return int64(cuda.gridDim.x) * int64(cuda.blockDim.x)
