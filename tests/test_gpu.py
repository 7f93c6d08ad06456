"""On a GPU: the models offloaded by default, the same answers as on the CPU, partial offload,
best-of-N and `serve --parallel 4` on the GPU, and a clear error for what does not fit.

Skipped where llama.cpp has no GPU here (a CPU build of llama-cpp-python, or no GPU found); the
GPU kit (tools/gpu_kit.py, docs/gpu.md) runs them on a GPU machine. The stand-ins of the real
pairs come from $BLENDIN_CPP_STANDINS (the kit writes them there), else the real models are used
where they are cached.

A GPU computes with other kernels than the CPU (and one row with other kernels than several), so
GPU and CPU logits differ in the last bits: answers must be equal token for token, except from a
token where the CPU's two most likely tokens were a near tie (the tolerances of test_parallel.py:
the demo pair's, and the real quantized models' larger ones).
"""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

import blendin_cpp as bc
from blendin_cpp import best_of_n as bon
from blendin_cpp import real_models
from blendin_cpp.model import default_gpu_layers, gpu_devices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_parallel import LOGPROB_TOL, REAL_LOGPROB_TOL, REAL_TIE, TIE, assert_same  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
sys.path.insert(0, str(ROOT / "bench"))
import load_server  # noqa: E402

pytestmark = pytest.mark.skipif(
    not gpu_devices(), reason="no GPU: this llama-cpp-python build has no GPU backend or finds no GPU "
                              "(build it with CMAKE_ARGS=-DGGML_CUDA=on, see docs/gpu.md)")

QUESTIONS = [json.loads(line)["question"] for line in (DEMO / "dev.jsonl").read_text().splitlines()[:6]]


def on_gpu(model: bc.Model) -> float:
    """MiB of the model's weights in GPU buffers (llama.cpp names them after the device: CUDA0, ...;
    host buffers are CPU, CPU_Mapped, CPU_REPACK, CUDA_Host, ...)."""
    return sum(mib for name, mib in model.buffer_types.items() if not name.startswith("CPU") and "Host" not in name)


def embedding_mib(path: Path) -> float:
    """The input embedding's MiB: llama.cpp keeps it in host memory even with every layer offloaded."""
    from gguf import GGUFReader
    return next(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name == "token_embd.weight") / 2**20


def demo(n_gpu_layers=None, **kw) -> dict:
    kw = dict(n_ctx=1024, kv_type="f32", n_threads=4, n_gpu_layers=n_gpu_layers, **kw)
    return {r: bc.Model(str(DEMO / f"{r}.gguf"), **kw) for r in ("base", "guide")}


def compare(cpu: bc.Blender, gpu: bc.Blender, prompts, what: str, *, tie: float, tol: float, **kw) -> int:
    """Each prompt on the CPU and on the GPU (see the module's docstring); returns how many were
    identical to the last token."""
    identical = 0
    for i, p in enumerate(prompts):
        a = cpu.complete(p, top_logprobs=2, diagnostics=True, **kw)
        b = gpu.complete(p, top_logprobs=2, diagnostics=True, **kw)
        identical += assert_same(a, b, f"{what}, prompt {i}", tie=tie, tol=tol)
    return identical


def test_models_go_to_the_gpu_by_default_and_0_keeps_them_on_the_cpu():
    assert default_gpu_layers() == -1
    gpu, cpu = demo(), demo(n_gpu_layers=0)
    for role in ("base", "guide"):
        total = sum(gpu[role].buffer_types.values())
        assert on_gpu(gpu[role]) >= total - embedding_mib(DEMO / f"{role}.gguf") - 0.05, gpu[role].buffer_types
        assert on_gpu(cpu[role]) == 0, cpu[role].buffer_types


@pytest.mark.parametrize("method", ["blendin", "nudging", "nudging_word"])
def test_greedy_tokens_on_the_demo_pair_equal_the_cpu_run(method):
    gpu, cpu = demo(n_gpu_layers=-1), demo(n_gpu_layers=0)
    blend = lambda m: bc.Blender(m["base"], m["guide"], method=method)  # noqa: E731
    identical = compare(blend(cpu), blend(gpu), QUESTIONS, method, tie=TIE, tol=LOGPROB_TOL, max_tokens=32)
    assert identical >= len(QUESTIONS) - 1, f"{identical}/{len(QUESTIONS)} identical"


def standin_pair(pair: str) -> tuple[str, str]:
    """The pair's stand-ins ($BLENDIN_CPP_STANDINS), else the real models if cached; else skip."""
    p = real_models.PAIRS[pair]
    folder = os.environ.get("BLENDIN_CPP_STANDINS")
    paths = []
    for name in (p.base, p.guide):
        path = Path(folder) / f"{name}.gguf" if folder else None
        path = path if path is not None and path.exists() else real_models.cached_path(name)
        if path is None:
            pytest.skip(f"neither a stand-in of {name} in $BLENDIN_CPP_STANDINS nor the real model in the cache")
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.mark.parametrize("pair", ["real", "qwen"])
def test_the_quantized_pairs_on_the_gpu_equal_the_cpu_within_the_rounding_tolerance(pair):
    base, guide = standin_pair(pair)
    kw = dict(n_ctx=512, n_threads=8)
    blend = lambda ngl: bc.Blender(bc.Model(base, n_gpu_layers=ngl, **kw),  # noqa: E731
                                   bc.Model(guide, n_gpu_layers=ngl, **kw), method="blendin")
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    compare(blend(0), blend(-1), prompts, pair, tie=REAL_TIE, tol=REAL_LOGPROB_TOL, max_tokens=24, ignore_eos=True)


def test_partial_offload_splits_the_layers_and_gives_the_same_answers():
    full, part = demo(n_gpu_layers=-1), demo(n_gpu_layers=2)
    b = part["base"]
    assert 0 < on_gpu(b) < sum(b.buffer_types.values()), b.buffer_types  # some layers here, some there
    blend = lambda m: bc.Blender(m["base"], m["guide"])  # noqa: E731
    compare(blend(full), blend(part), QUESTIONS[:3], "partial", tie=TIE, tol=LOGPROB_TOL, max_tokens=24)


def test_best_of_n_candidates_on_the_gpu_are_their_seeds_generations():
    m = demo(n_gpu_layers=-1, n_seq_max=4)
    blender = bc.Blender(m["base"], m["guide"])
    prompt = QUESTIONS[0]
    cands = bon.generate_candidates(blender, prompt, 4, seed=7, max_tokens=24, temperature=0.8)
    assert len({tuple(c.tokens) for c in cands}) > 1
    singles = [blender.complete(prompt, max_tokens=24, temperature=0.8, seed=7 + i) for i in range(4)]
    bodies = [[t for t in s.tokens if not blender.base.is_eog(t)] for s in singles]
    # a batch of 4 rows and a single row take other GPU kernels: a candidate may part from its
    # single generation only where a sampled token sat at the very edge of its draw
    same = sum(c.tokens == b for c, b in zip(cands, bodies))
    assert same >= 3, [(c.tokens, b) for c, b in zip(cands, bodies)]


def test_serve_parallel_4_on_the_gpu_answers_as_alone(tmp_path):
    port = load_server.free_port()
    log = tmp_path / "server.log"
    models = [a for r in ("base", "guide") for a in (f"--{r}", str(DEMO / f"{r}.gguf"))]
    proc = load_server.start_server(models, port=port, log_path=str(log), extra=["--parallel", "4", "--ctx", "512"])
    try:
        url = f"http://127.0.0.1:{port}"
        bodies = [{"messages": [{"role": "user", "content": q}], "max_tokens": 24, "logprobs": True,
                   "top_logprobs": 2} for q in QUESTIONS]
        with httpx.Client(base_url=url, timeout=120) as c:
            alone = [c.post("/v1/chat/completions", json=b).json() for b in bodies]
        together: dict = {}

        def ask(k, b):
            with httpx.Client(base_url=url, timeout=120) as c:
                together[k] = c.post("/v1/chat/completions", json=b).json()
        threads = [threading.Thread(target=ask, args=(k, b)) for k, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert len(together) == len(bodies)
        for k, want in enumerate(alone):
            a, b = want["choices"][0]["logprobs"]["content"], together[k]["choices"][0]["logprobs"]["content"]
            for x, y in zip(a, b):
                if x["token"] != y["token"]:  # only where alone's top two were a near tie
                    top = x["top_logprobs"]
                    assert top[0]["logprob"] - top[1]["logprob"] < TIE, (k, x, y)
                    break
                assert abs(x["logprob"] - y["logprob"]) < LOGPROB_TOL, (k, x, y)
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_kv_cache_larger_than_the_gpu_is_a_clear_error_not_a_crash():
    """2^25 cells of the demo base's f32 KV cache need 256 GiB, more than any GPU has: llama.cpp
    cannot allocate them there, and the load must say so (in a subprocess: a crash must not take
    the tests with it). Not more cells: llama.cpp's own record of the cells lives in host memory
    (about 40 bytes a cell)."""
    code = (f"import blendin_cpp as bc\n"
            f"try:\n"
            f"    bc.Model({str(DEMO / 'base.gguf')!r}, n_ctx=2**25, kv_type='f32', n_gpu_layers=-1)\n"
            f"    print('LOADED')\n"
            f"except (ValueError, MemoryError, bc.BlendError) as e:\n"
            f"    print('ERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.startswith("ERROR"), r.stdout
    assert "could not create a context of 33554432 tokens" in r.stdout, r.stdout
