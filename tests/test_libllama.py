"""Exactly one libllama (and one libggml) is mapped into the process, whatever the import order."""
import subprocess
import sys

import pytest

CHILD = r'''
import sys
first, second = sys.argv[1], sys.argv[2]
__import__(first)
__import__(second)
import blendin_cpp, llama_cpp
from blendin_cpp import llama_cpp_peer
# use both for real, so that lazily loaded pieces are in place
m = blendin_cpp.Model(sys.argv[3], n_ctx=32)
ll = llama_cpp_peer.load(sys.argv[3], n_ctx=32, verbose=False)
ll.eval(ll.tokenize(b"hello"))
m.logits(m.tokenize("hello"))
maps = {}
for line in open("/proc/self/maps"):
    parts = line.split()
    if len(parts) >= 6 and ("libllama" in parts[5] or "libggml-base" in parts[5]):
        name = "libllama" if "libllama" in parts[5] else "libggml-base"
        maps.setdefault(name, set()).add((parts[3], parts[4], parts[5]))
for name, files in sorted(maps.items()):
    print(name, len({inode for _, inode, _ in files}), sorted({p for _, _, p in files}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("order", [("blendin_cpp", "llama_cpp"), ("llama_cpp", "blendin_cpp")],
                         ids=["blendin_first", "llama_cpp_first"])
def test_single_libllama(order, tiny_model):
    r = subprocess.run([sys.executable, "-c", CHILD, *order, tiny_model], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert set(lines) == {"libllama", "libggml-base"}, r.stdout
    for name, rest in lines.items():
        count = int(rest.split(" ", 1)[0])
        assert count == 1, f"{name} is mapped from {count} files: {rest}"
