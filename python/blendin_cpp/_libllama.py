"""Where libllama comes from, decided once for the whole process.

llama-cpp-python installs two byte-identical copies of its libraries (site-packages/lib and
site-packages/llama_cpp/lib) and loads llama_cpp/lib/libllama.so by absolute path (or from
LLAMA_CPP_LIB_PATH). If our extension were imported first, the dynamic loader could map a second
copy, and two libllamas in one process would keep two backend registries and two log callbacks.
So we load exactly the file llama_cpp would load, before our extension: the extension's
DT_NEEDED entry (libllama.so.0) then resolves to it by SONAME, and a later `import llama_cpp`
dlopens the same path and gets the same handle. A ctypes load costs ~9 ms; importing llama_cpp
itself would cost ~180 ms.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

_NAMES = {"linux": ["libllama.so"], "darwin": ["libllama.dylib"], "win32": ["llama.dll", "libllama.dll"]}


def libllama_dir() -> Path:
    """The folder llama_cpp loads its libraries from (LLAMA_CPP_LIB_PATH wins, as in llama_cpp)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ImportError("blendin_cpp needs llama-cpp-python (pip install llama-cpp-python==0.3.36)")
    return Path(spec.origin).parent / "lib"


def load_libllama() -> ctypes.CDLL:
    folder = libllama_dir()
    for name in _NAMES.get(sys.platform, ["libllama.so"]):
        path = folder / name
        if path.exists():
            return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    raise ImportError(f"no libllama found in {folder}: is llama-cpp-python installed correctly?")
