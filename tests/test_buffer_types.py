"""Where llama.cpp puts the weights: in its plain CPU buffers for a deterministic model (the
default: the repack and AMX kernels compute one row in another order than several, so answers
would depend on the batch), in its extra ones (CPU_REPACK) for a model that is not, AMX only when
asked for (it segfaults on quantized models on some Xeons), and the same choice for blendin_cpp's
Model and for the llama-cpp-python references it is compared against."""
import os
import subprocess
import sys

import pytest

import blendin_cpp as bc
from blendin_cpp import _core, real_models
from blendin_cpp.model import AMX_ENV, amx_requested, use_extra_buffer_types

pytest.importorskip("llama_cpp")

Q4K = "qwen2.5-coder-0.5b-instruct-q4_k_m"  # Q4_K weights: what llama.cpp's AMX kernels crash on
PLAIN = {"CPU", "CPU_Mapped"}  # llama.cpp's ordinary CPU buffers (allocated or memory-mapped)


@pytest.fixture(scope="module")
def q4k():
    try:
        return str(real_models.fetch(Q4K))
    except real_models.FetchError as e:
        pytest.fail(f"could not fetch {Q4K}: {e}", pytrace=False)


def test_deterministic_loads_use_the_plain_buffers_and_the_others_the_extra_ones(q4k, monkeypatch):
    monkeypatch.delenv(AMX_ENV, raising=False)
    offered = _core.cpu_extra_buffer_types()
    m = bc.Model(q4k, n_ctx=64)
    assert m.deterministic is True and set(m.buffer_types) <= PLAIN
    assert use_extra_buffer_types() is False and use_extra_buffer_types(True, amx=True) is False
    has_amx = any("AMX" in name for name in offered)
    assert use_extra_buffer_types(False) is (bool(offered) and not has_amx)  # AMX: only when asked for
    assert use_extra_buffer_types(False, amx=True) is True
    if "CPU_REPACK" in offered and not has_amx:  # safe to try here
        fast = bc.Model(q4k, n_ctx=64, deterministic=False)
        assert fast.deterministic is False and "CPU_REPACK" in fast.buffer_types
    with pytest.raises(ValueError, match="amx=True needs deterministic=False"):
        bc.Model(q4k, n_ctx=64, amx=True)
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        bc.Model(q4k, n_ctx=64, deterministic="no")


def test_amx_opt_in_reads_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(AMX_ENV, raising=False)
    assert amx_requested() is False
    monkeypatch.setenv(AMX_ENV, "1")
    assert amx_requested() is True
    assert amx_requested(False) is False  # the argument wins
    monkeypatch.setenv(AMX_ENV, "0")
    assert amx_requested() is False and amx_requested(True) is True


# Each child decodes the Q4_K model and prints its greedy next token and the buffer types it used.
# A segfault in llama.cpp's AMX kernels kills the child (exit -11), not the test run.
BLENDIN_CHILD = r'''
import sys, numpy as np, blendin_cpp as bc
m = bc.Model(sys.argv[1], n_ctx=128, n_threads=2, deterministic=sys.argv[2] == "1")
row = m.logits(m.tokenize("def fibonacci(n):"))[-1]
print(int(np.argmax(row)), " ".join(sorted(m.buffer_types)))
'''
PEER_CHILD = r'''
import sys, numpy as np, blendin_cpp as bc
from blendin_cpp import llama_cpp_peer
bc.set_verbose(True)  # our log callback (installed at load) passes llama.cpp's log to stderr
ll = llama_cpp_peer.load(sys.argv[1], deterministic=sys.argv[2] == "1", n_ctx=128, n_threads=2, logits_all=True,
                         verbose=True)
tokens = ll.tokenize(b"def fibonacci(n):", add_bos=True, special=False)
ll.eval(tokens)
print(int(np.argmax(ll.scores[len(tokens) - 1])))
'''


def run_child(code: str, path: str, deterministic: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != AMX_ENV}
    return subprocess.run([sys.executable, "-c", code, path, "1" if deterministic else "0"], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("deterministic", [True, False])
def test_real_q4k_decodes_in_model_and_reference_alike(q4k, deterministic):
    ours = run_child(BLENDIN_CHILD, q4k, deterministic)
    assert ours.returncode == 0, f"bc.Model exited {ours.returncode}: {ours.stderr[-2000:]}"
    ref = run_child(PEER_CHILD, q4k, deterministic)
    assert ref.returncode == 0, f"llama_cpp_peer.load exited {ref.returncode}: {ref.stderr[-2000:]}"
    token, *ours_types = ours.stdout.split()
    assert int(token) == int(ref.stdout.split()[0])  # the same greedy token from both loads
    # the reference logs its buffers (llama.cpp's "<name> model buffer size = <MiB> MiB" lines)
    ref_types = sorted({line.split(":", 1)[1].split()[0] for line in ref.stderr.splitlines()
                        if "model buffer size" in line})
    assert ref_types == sorted(ours_types)
