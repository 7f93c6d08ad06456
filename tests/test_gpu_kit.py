"""The offline GPU kit (tools/gpu_kit.py), checked without building it: what the trimming keeps and
drops, its size, run.sh, and the stand-ins its headers make (bench/standins.py).

The kit is made once for this module (llama-cpp-python's sdist and the wheels are downloaded with
pip the first time and cached in ~/.cache/blendin_cpp/kit; the real models' headers come from the
model cache, which the tests fill anyway).
"""
import json
import lzma
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import blendin_cpp as bc
from blendin_cpp import real_models
from blendin_cpp.testing import random_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))
import gpu_kit  # noqa: E402
import standins  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit") / "kit"
    manifest = gpu_kit.make_kit(out)
    return out, manifest


def sdist_names(path: Path) -> set[str]:
    with tarfile.open(path) as t:
        return {m.name.split("/", 1)[1] for m in t if m.isfile() and "/" in m.name}


def test_the_kit_is_under_its_size_limit_and_holds_what_run_sh_uses(kit):
    out, manifest = kit
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size == manifest["bytes"] <= 60 * 2**20
    for name in ("run.sh", "run_kit.py", "blendin_cpp-src.tar.gz", "manifest.json", "standins/standins.json",
                 f"llama_cpp_python-{gpu_kit.llama_cpp_python_version()}.tar.gz"):
        assert (out / name).is_file(), name
    r = subprocess.run(["bash", "-n", str(out / "run.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(out / "run_kit.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--cpu" in r.stdout and "--arch" in r.stdout, r.stderr
    r = subprocess.run(["bash", str(out / "run.sh")], capture_output=True, text=True)  # no OUT: usage, no work
    assert r.returncode == 2 and "usage" in r.stderr


def test_phases_reuse_an_earlier_runs_products_and_refuse_unknown_names(kit, tmp_path):
    """A GPU run split over two calls: the second asks for the benchmarks only and must find the
    build, the install and the stand-ins of the first in the same --work, or skip what needs them."""
    out, _ = kit
    r = subprocess.run([sys.executable, str(out / "run_kit.py"), str(tmp_path / "o"), "--cpu", "--phases", "bench-qwen,nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown phase(s) nope" in r.stderr, r.stderr

    def run(work: Path) -> dict:
        report = tmp_path / work.name
        subprocess.run([sys.executable, str(out / "run_kit.py"), str(report), "--cpu", "--work", str(work),
                        "--phases", "gpu-tests"], capture_output=True, text=True, timeout=120)
        return {p["phase"]: p["status"] for p in json.loads((report / "report.json").read_text())["phases"]}

    empty = run(tmp_path / "empty")  # nothing made before: nothing reused, the tests cannot run
    assert [empty[p] for p in ("unpack", "build", "install", "standins", "gpu-tests")] == ["skipped"] * 5, empty
    made = tmp_path / "made"  # what an earlier run leaves: sources, llama_cpp's and blendin_cpp's installs
    (made / "src" / "blendin_cpp").mkdir(parents=True)
    (made / "src" / "blendin_cpp" / "pyproject.toml").write_text("")
    (made / "prefix" / "llama_cpp" / "lib").mkdir(parents=True)
    (made / "prefix" / "llama_cpp" / "lib" / "libllama.so").write_text("")
    (made / "prefix" / "blendin_cpp").mkdir()
    phases = run(made)
    assert [phases[p] for p in ("unpack", "build", "install", "standins")] == ["reused"] * 3 + ["skipped"], phases
    assert phases["bench-qwen"] == "skipped"  # not asked for


def test_the_trimmed_llama_cpp_python_keeps_every_file_a_cuda_or_cpu_build_reads(kit):
    out, _ = kit
    version = gpu_kit.llama_cpp_python_version()
    full = sdist_names(gpu_kit.sdist(version))
    trimmed = sdist_names(out / f"llama_cpp_python-{version}.tar.gz")
    assert trimmed < full
    lc = "vendor/llama.cpp/"
    must_keep = [n for n in full if n.startswith((
        f"{lc}ggml/src/ggml-cuda/", f"{lc}ggml/src/ggml-cpu/", f"{lc}ggml/src/ggml-rpc/", f"{lc}ggml/include/",
        f"{lc}ggml/cmake/", f"{lc}src/", f"{lc}include/", f"{lc}common/", f"{lc}cmake/", f"{lc}vendor/",
        f"{lc}tools/mtmd/", "llama_cpp/"))]
    assert not set(must_keep) - trimmed
    cuda = [n for n in trimmed if n.startswith(f"{lc}ggml/src/ggml-cuda/")]
    assert any(n.endswith("template-instances/fattn-vec-instance-f16-f16.cu") for n in cuda)
    assert sum(n.endswith(".cu") for n in cuda) > 100  # the kernels and every template instance
    for n in ("CMakeLists.txt", "pyproject.toml", "PKG-INFO", "README.md", f"{lc}CMakeLists.txt",
              f"{lc}ggml/CMakeLists.txt", f"{lc}ggml/src/CMakeLists.txt", f"{lc}ggml/src/ggml-cuda/CMakeLists.txt",
              f"{lc}LICENSE"):
        assert n in trimmed, n
    # what goes: the vocabulary test models, docs, other backends; nothing a build reads
    dropped = full - trimmed
    assert any(n.startswith(f"{lc}models/ggml-vocab") for n in dropped)
    assert any(n.startswith(f"{lc}ggml/src/ggml-vulkan/") for n in dropped)
    assert not any(n.startswith(f"{lc}ggml/src/ggml-{b}/") for n in trimmed for b in ("metal", "sycl", "vulkan"))


def test_the_kit_carries_the_tracked_files_the_wheels_and_the_real_models_headers(kit):
    out, manifest = kit
    with tarfile.open(out / "blendin_cpp-src.tar.gz") as t:
        names = {m.name for m in t}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert {f"blendin_cpp/{n}" for n in tracked if (ROOT / n).is_file()} == names
    assert {"blendin_cpp/models/demo/base.gguf", "blendin_cpp/tests/test_gpu.py"} <= names
    wheels = sorted(p.name for p in (out / "wheels").glob("*.whl"))
    assert len(wheels) == len(gpu_kit.WHEELS) == len(manifest["wheels"])
    core = [w for w in wheels if w.startswith("pydantic_core-")]
    assert len(core) == 1 and "cp312" in core[0] and "x86_64" in core[0]
    assert all(w.endswith("-py3-none-any.whl") for w in wheels if w not in core)  # the rest pure Python
    table = json.loads((out / "standins" / "standins.json").read_text())
    assert set(table["models"]) == set(real_models.MODELS)
    for name, m in table["models"].items():
        header = lzma.decompress((out / "standins" / f"{name}.header.xz").read_bytes())
        assert header[:4] == b"GGUF" and len(header) == m["header_bytes"] and m["size"] == real_models.MODELS[name].size


def tensor_table(path) -> list[tuple]:
    from gguf import GGUFReader
    return [(t.name, tuple(t.shape), t.tensor_type) for t in GGUFReader(str(path)).tensors]


def test_a_stand_in_has_its_models_header_tensors_and_tokenizer_and_sane_logits(tmp_path):
    real = random_llama(tmp_path / "real.gguf", n_vocab=600, n_embd=64, n_layer=2, dtype="f16", seed=3)
    header = standins.read_header(real)
    out = standins.write_standin(header, real.stat().st_size, tmp_path / "standin.gguf", seed=1)
    assert out.stat().st_size == real.stat().st_size and out.read_bytes()[:len(header)] == header
    assert tensor_table(out) == tensor_table(real)
    a, b = bc.Model(str(real), n_ctx=64, n_threads=1), bc.Model(str(out), n_ctx=64, n_threads=1)
    text = "Question: What is the capital of France?\nAnswer:"
    assert a.tokenize(text) == b.tokenize(text)
    logits = b.logits(b.tokenize(text))
    assert np.isfinite(logits).all() and 3 < logits[-1].std() < 12  # about --logit-std (6)
    assert not np.allclose(logits, a.logits(a.tokenize(text)))  # the weights are new


def test_a_stand_in_of_a_quantized_real_model_keeps_every_weight_type(tmp_path):
    """SmolLM2-135M (Q4_1 and Q8_0 matrices): its stand-in has the same tensors in the same types,
    written by llama.cpp's quantizer, and decodes to finite logits."""
    real = real_models.fetch("smollm2-135m-instruct-q4_1")
    out = standins.write_standin(standins.read_header(real), real.stat().st_size, tmp_path / "smol.gguf")
    assert tensor_table(out) == tensor_table(real)
    m = bc.Model(str(out), n_ctx=64, n_threads=2)
    logits = m.logits(m.tokenize("Hello there"))
    assert logits.shape == (len(m.tokenize("Hello there")), 49152) and np.isfinite(logits).all()
