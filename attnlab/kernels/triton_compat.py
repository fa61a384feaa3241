"""Small compatibility shims for Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter holds scalars as 1-element arrays and turns them into loop bounds with
``int(array)``, which NumPy >= 2.4 refuses for ndim > 0: ``interpreter_compat`` patches that one
conversion (only when interpreting; compiled kernels are untouched). Idempotent."""

from __future__ import annotations

import os


def interpreter_compat() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_attnlab_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._attnlab_compat = True
    interpreter._patch_lang_tensor = patched


__all__ = ["interpreter_compat"]
