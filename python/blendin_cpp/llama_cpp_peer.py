"""llama-cpp-python's `Llama`, loaded the way `blendin_cpp.Model` loads a model.

Every comparison in the project (the tests' references, the bench's Python-loop peer and
base-alone rows, the per-token HTTP peer's servers) loads through here, so that both sides use
the same weight buffer types: like for like, and no side crashes where the other would not
(llama.cpp's AMX buffers, see `model.use_extra_buffer_types`).

`python -m blendin_cpp.llama_cpp_peer server ARGS...` runs `python -m llama_cpp.server ARGS...`
with the same load.
"""
from __future__ import annotations

import sys
import threading

from .model import default_gpu_layers, use_extra_buffer_types

_patch_lock = threading.Lock()


def _patch(use_extra_bufts: bool):
    """Make llama_cpp's default model parameters carry our `use_extra_bufts` (its `Llama` takes
    no argument for it); returns the function it replaced."""
    import llama_cpp.llama_cpp as lc
    original = lc.llama_model_default_params

    def default_params():
        params = original()
        params.use_extra_bufts = use_extra_bufts
        return params

    lc.llama_model_default_params = default_params
    return original


def load(path: str, *, deterministic: bool = True, amx: bool | None = None, extra_buffer_types: bool | None = None,
         **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` with the weight buffer types a `Model(path,
    deterministic=..., amx=...)` gets, so that its logits are the same bits (or `extra_buffer_types`
    forced on or off, for the benchmark that compares the two), and, unless
    `n_gpu_layers` is given, blendin_cpp's default offload (every layer where there is a GPU;
    llama-cpp-python's own default is none)."""
    import llama_cpp
    import llama_cpp.llama_cpp as lc
    kwargs.setdefault("n_gpu_layers", default_gpu_layers())
    use = use_extra_buffer_types(deterministic, amx) if extra_buffer_types is None else bool(extra_buffer_types)
    with _patch_lock:
        original = _patch(use)
        try:
            return llama_cpp.Llama(path, **kwargs)
        finally:
            lc.llama_model_default_params = original


def _main(argv: list[str]) -> int:
    if not argv or argv[0] != "server":
        print("usage: python -m blendin_cpp.llama_cpp_peer server [llama_cpp.server arguments]", file=sys.stderr)
        return 2
    _patch(use_extra_buffer_types())
    from llama_cpp.server.__main__ import main
    sys.argv = ["llama_cpp.server", *argv[1:]]
    main()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
