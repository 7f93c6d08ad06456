"""blendin_cpp: inference-time alignment of local GGUF models on llama.cpp.

A large base model and a small guide model are decoded together in one C++ loop; at every token
the loop decides how far to trust each (BlendIn, Nudging, and the baselines).
"""
from ._libllama import load_libllama

# One libllama per process: load llama-cpp-python's copy before our extension, which links
# libllama.so.0 by SONAME and so binds to the copy already loaded (see _libllama.py).
load_libllama()

from ._core import BlendError, set_verbose  # noqa: E402
from .model import ContextLengthError, Model  # noqa: E402
from .blender import METHODS, Blender, Completion, PromptsFailed, Score, Step  # noqa: E402
from .chat_template import base_transcript  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Model", "Blender", "Step", "Completion", "Score", "METHODS", "BlendError", "PromptsFailed",
           "ContextLengthError", "base_transcript", "set_verbose"]
