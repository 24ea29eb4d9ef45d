"""Triton kernels, one module per op family.

Under emulation (PYDL_INTERPRET=1 switches Triton's interpreter on) this package makes one
change to the interpreter (Triton 3.6-3.7), once when it loads: `_builtins_by_name`. The interpreter
re-patches `triton.language` before every launch *and every call of a @triton.jit helper inside
a kernel* (`_patch_lang`), each time listing every member of tl, tl.tensor, tl.math and the
descriptor class with `inspect.getmembers` to find the builtins; in a helper's call they are
all patched already, so that search finds nothing and costs the most. It took about 13% of a
Triton-heavy test slice. The replacement lists each package's builtins once (at its first
patch: the members that are builtins or the interpreter's replacements of one, as a helper's
call leaves its patches in place) and checks only those names each time: what it patches is the
same in every call.
"""


def _builtins_by_name() -> None:
    """triton.runtime.interpreter._patch_builtin, its member search done once per package."""
    import inspect

    from triton.language import core
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_builtin", None)
    if original is None or getattr(original, "by_name", False) or \
            list(inspect.signature(original).parameters) != ["pkg", "builder", "scope"]:
        return                      # another Triton: leave its interpreter as it is
    names: dict = {}                # package -> the names of its builtins

    def builtin_or_patched(member) -> bool:
        """A builtin, or what the interpreter put in one's place (its wrappers, its reduce and
        scan): a helper's call leaves its patches in place until the launch ends, so a package
        may be first seen with some of its builtins replaced."""
        return core.is_builtin(member) or \
            getattr(member, "__module__", None) == interpreter.__name__

    def patch_builtin(pkg, builder, scope):
        listed = names.get(pkg)
        if listed is None:
            listed = names[pkg] = [n for n, m in inspect.getmembers(pkg)
                                   if builtin_or_patched(m)]
        for name in listed:
            member = getattr(pkg, name, None)
            if core.is_builtin(member):     # not already patched by an enclosing call
                interpreter._patch_attr(pkg, name, member, builder, scope)

    patch_builtin.by_name, patch_builtin.original = True, original
    interpreter._patch_builtin = patch_builtin


def _interpreting() -> bool:
    """Whether @triton.jit gives interpreted functions: Triton's own reading of the switch
    pydl set (this package reads no environment variable)."""
    import triton
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


if _interpreting():
    _builtins_by_name()
