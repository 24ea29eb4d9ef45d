"""`builder`: the decorator of every function that makes a Numba kernel (or device function)
per set of compile-time constants.

Tile sizes and thread counts size a kernel's shared and local arrays, so Numba needs them as
constants: a builder `build(*args)` defines the kernel as a closure over them and returns the
`cuda.jit` object. `builder(build)` makes it once per distinct argument tuple (small ints,
bools and tuples of them) and caches it, and it tags what it made with BUILT_BY: (the
builder's module, its qualified name, the arguments). The tag is how a tool names a kernel
that has no module-level name: `rebuild(*made.BUILT_BY)` returns the same object in the same
process, and an equal kernel in another one (`python -m bench numba-resources` records the
tag of each kernel launched in the CUDA simulator and compiles the rebuilt kernel for a GPU).
A device function a builder makes is a closure variable of the kernels that call it, so it
compiles as part of them.
"""
import functools
import importlib
import operator

import numpy as np

BUILT_BY = "pydl_built_by"
MADE = "pydl_made"


def _constant(a):
    """A builder argument as a plain Python value: bool, int or a tuple of them."""
    if isinstance(a, tuple):
        return tuple(_constant(x) for x in a)
    if isinstance(a, (bool, np.bool_)):
        return bool(a)
    return operator.index(a)


def builder(build):
    """`build(*args)`, made once per distinct args and tagged with BUILT_BY (see above)."""
    made = {}

    @functools.wraps(build)
    def get(*args):
        obj = made.get(args)        # (a NumPy int or bool finds the plain value's entry)
        if obj is None:
            key = tuple(_constant(a) for a in args)
            obj = made[key] = build(*key)
            setattr(obj, BUILT_BY, (build.__module__, build.__qualname__, key))
        return obj
    setattr(get, MADE, made)
    return get


def rebuild(module: str, qualname: str, args) -> object:
    """What the builder `qualname` of `module` makes for `args` (a BUILT_BY tag; lists, as a
    JSON round trip leaves them, count as tuples)."""
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    as_tuple = lambda a: tuple(map(as_tuple, a)) if isinstance(a, list) else a  # noqa: E731
    return fn(*as_tuple(list(args)))
