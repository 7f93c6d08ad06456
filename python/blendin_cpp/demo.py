"""The bundled demo models (trained by models/train_demo.py, installed inside the package)."""
from __future__ import annotations

from pathlib import Path

ROLES = ("base", "guide", "guide-unreliable", "anti", "guide-xvocab")
# the context the demo models were trained on (models/train_demo.py); their files say 2048, the
# writer's default, but positions beyond this one were never seen
TRAINED_CTX = 512


def demo_dir() -> Path:
    """Where the demo GGUF files are: inside the installed package, or models/demo/ of a source
    checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    for d in (here / "models", here.parent.parent / "models" / "demo"):
        if (d / "base.gguf").exists():
            return d
    raise FileNotFoundError("the bundled demo models are missing: reinstall blendin_cpp, or run "
                            "models/train_demo.py, or pass --base and --guide")


def demo_path(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown demo model {role!r}; choose one of: {', '.join(ROLES)}")
    return str(demo_dir() / f"{role}.gguf")


def heldout_path() -> str:
    return str(demo_dir() / "heldout.jsonl")


# Questions for the chat's banner: from the dev split (the guides never trained on them), one of
# each kind, chosen among those the pair answers right with the default settings
# (tests/test_chat.py checks that it still does).
EXAMPLE_QUESTIONS = ("What is the capital of Gafashe?", "What colour is the flag of Nabateand?", "What is 38 + 41?")
