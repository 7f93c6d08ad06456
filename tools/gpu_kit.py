"""Make the offline GPU kit: one folder that builds, tests and benchmarks blendin_cpp on a GPU
machine with no network (docs/gpu.md).

    python tools/gpu_kit.py kit          # writes kit/ (at most 60 MiB)
    bash kit/run.sh OUT                  # there: build for the local GPU, test, benchmark, report
    bash kit/run.sh OUT --cpu            # anywhere: the same with CUDA off (a rehearsal)

The kit holds:
- llama-cpp-python's pinned source distribution, trimmed (llama.cpp's vocabulary test models, docs,
  examples, tools other than mtmd, tests, and the ggml backends other than CPU, CUDA and RPC are
  left out: 76.6 MB -> a few MB compressed); it still builds with and without -DGGML_CUDA=on;
- the project's git-tracked files as they are in the working tree (the demo models among them);
- the wheels for Python 3.12 on x86-64 Linux that a CUDA image with numpy, nanobind,
  scikit-build-core, pytest, jinja2 and httpx typically lacks (WHEELS below says why each);
- the headers (metadata, tokenizer and tensor table, no weights) of the real models, from which
  the GPU machine writes stand-ins of the same shapes, vocabularies and weight types
  (bench/standins.py): the real files (98 MB to 1.1 GB) do not travel;
- run.sh and run_kit.py (tools/kit/), which do the work there.

The sdist and the wheels are downloaded with pip once and kept in ~/.cache/blendin_cpp/kit; the
real models come from the project's model cache (`python -m blendin_cpp models fetch real qwen`).
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

LIMIT = 60 * 2**20
CACHE = Path(os.environ.get("BLENDIN_CPP_KIT_CACHE", Path.home() / ".cache" / "blendin_cpp" / "kit"))

# The pure-python wheels (and pydantic-core, the one compiled one, for CPython 3.12) that the server,
# the model tools and llama-cpp-python need beyond the image's numpy, jinja2, httpx, pyyaml, tqdm,
# click and h11. Exact versions: the kit installs them with --no-deps, so it must be a closed set.
WHEELS = {
    "fastapi==0.165.0": "serve (the OpenAI-compatible server)",
    "starlette==1.10.0": "fastapi's web layer",
    "pydantic==2.14.4": "fastapi's request models (server/schemas.py)",
    "pydantic-core==2.50.5": "pydantic's compiled core (cp312, manylinux2014)",
    "annotated-types==0.8.0": "needed by pydantic",
    "typing-inspection==0.4.5": "needed by pydantic and fastapi",
    "annotated-doc==0.0.7": "needed by fastapi",
    "opentelemetry-api==1.45.2": "needed by fastapi",
    "typing-extensions==4.16.0": "pydantic and anyio need >= 4.16, newer than some images carry",
    "anyio==4.16.0": "starlette's event loop layer, at the version typing-extensions 4.16 goes with",
    "uvicorn==0.55.0": "serve's HTTP server",
    "gguf==0.19.0": "reading and writing GGUF files (the stand-ins, the tests' generated models)",
    "diskcache==5.6.3": "imported by llama_cpp (llama-cpp-python's Python package)",
    "scikit-build-core==1.1.2": "the build backend at the version pyproject.toml pins (the image's may differ)",
    "nanobind==3.1.0": "the bindings library at the version pyproject.toml pins (the image's may differ)",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

# What a CUDA or CPU build of llama-cpp-python does not read (paths inside the sdist's top folder).
# ggml only descends into the backends that are switched on; llama-cpp-python builds tools/mtmd
# (LLAVA_BUILD, on by default), so that one tool stays.
DROP = [
    ".git/", "vendor/llama.cpp/.git", "docs/", "examples/", "tests/", "docker/",
    *(f"vendor/llama.cpp/{d}/" for d in (
        "models", "docs", "media", "examples", "tests", "benches", "pocs", "gguf-py", "conversion", "scripts",
        "ci", ".devops", ".github", ".gemini", ".pi", "skills", "app", "grammars", "requirements")),
    *(f"vendor/llama.cpp/ggml/src/ggml-{b}/" for b in (
        "blas", "cann", "et", "hexagon", "hip", "metal", "musa", "opencl", "openvino", "sycl", "virtgpu", "vulkan",
        "webgpu", "zdnn", "zendnn")),
]
DROP_RE = re.compile(r"vendor/llama\.cpp/(tools/(?!mtmd/|CMakeLists\.txt$)|convert_[^/]*\.py$)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama_cpp_python_version() -> str:
    """The version pyproject.toml pins (the build and the runtime pins are equal)."""
    m = re.search(r'"llama-cpp-python==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if not m:
        raise SystemExit("pyproject.toml pins no llama-cpp-python==VERSION")
    return m.group(1)


def pip_download(args: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar",
           "off", "-q", "-d", str(dest), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pip download {' '.join(args)} failed:\n{r.stderr[-2000:]}")


def sdist(version: str) -> Path:
    """llama-cpp-python's source distribution, from the cache or PyPI."""
    path = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not path.exists():
        log(f"downloading llama-cpp-python {version}'s source distribution with pip ...")
        pip_download(["--no-binary", "llama-cpp-python", f"llama-cpp-python=={version}"], CACHE)
    return path


def wheel_name(requirement: str) -> str:
    """The start of a wheel's file name for NAME==VERSION (wheel names use underscores)."""
    name, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def wheels() -> list[Path]:
    """The WHEELS for CPython 3.12 on x86-64 Linux, from the cache or PyPI."""
    folder = CACHE / "wheels-cp312"
    have = {p.name.lower(): p for p in folder.glob("*.whl")} if folder.exists() else {}
    out = []
    for req in WHEELS:
        found = [p for n, p in have.items() if n.startswith(wheel_name(req))]
        if not found:
            log(f"downloading the wheel {req} with pip ...")
            pip_download(["--only-binary", ":all:", "--python-version", "3.12", "--implementation", "cp",
                          *(a for p in PLATFORMS for a in ("--platform", p)), req], folder)
            found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(wheel_name(req))]
        if len(found) != 1:
            raise SystemExit(f"expected one wheel for {req} in {folder}, found {[p.name for p in found]}")
        out.append(found[0])
    return out


def kept(rel: str) -> bool:
    """Whether a path inside the sdist (below its top folder) goes into the trimmed source."""
    return not any(rel.startswith(d) for d in DROP) and not DROP_RE.match(rel)


def trim_sdist(src: Path, dest: Path) -> tuple[int, int]:
    """Write the trimmed sdist (same top folder, same name); returns (files kept, files dropped)."""
    n_kept = n_dropped = 0
    with tarfile.open(src) as tin, open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tout:
            for m in tin:
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if m.isdir() or not kept(rel + ("/" if m.isdir() else "")):
                    n_dropped += not m.isdir()
                    continue
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
                n_kept += 1
    return n_kept, n_dropped


def project_source(dest: Path) -> int:
    """The git-tracked files as they are in the working tree, under blendin_cpp/; returns how many."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    names = [n for n in files.decode().split("\0") if n and (ROOT / n).is_file()]
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n in sorted(names):
            tar.add(ROOT / n, arcname=f"blendin_cpp/{n}", recursive=False)
    return len(names)


def standin_headers(dest: Path, models_cache: Path | None) -> dict:
    """The real models' headers (xz), and what run_kit.py needs to write their stand-ins."""
    import standins
    from blendin_cpp import real_models
    dest.mkdir()
    table = {"pairs": {name: {"base": p.base, "guide": p.guide} for name, p in real_models.PAIRS.items()},
             "models": {}}
    for name, model in real_models.MODELS.items():
        path = real_models.cached_path(name, cache=models_cache) if models_cache else None
        path = path or real_models.fetch(name)
        header = standins.read_header(path)
        (dest / f"{name}.header.xz").write_bytes(lzma.compress(header, preset=6))
        table["models"][name] = {"size": model.size, "header_bytes": len(header), "description": model.description}
    (dest / "standins.json").write_text(json.dumps(table, indent=1))
    return table


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_kit(out: Path, *, models_cache: Path | None = None) -> dict:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    version = llama_cpp_python_version()
    log(f"trimming llama-cpp-python {version} ...")
    n_kept, n_dropped = trim_sdist(sdist(version), out / f"llama_cpp_python-{version}.tar.gz")
    log("packing the project's tracked files ...")
    n_src = project_source(out / "blendin_cpp-src.tar.gz")
    (out / "wheels").mkdir()
    carried = []
    for whl in wheels():
        shutil.copy2(whl, out / "wheels" / whl.name)
        carried.append(whl.name)
    log("reading the real models' headers ...")
    table = standin_headers(out / "standins", models_cache)
    for name in ("run.sh", "run_kit.py"):
        shutil.copy2(ROOT / "tools" / "kit" / name, out / name)
    manifest = {
        "llama_cpp_python": version,
        "sdist": {"files_kept": n_kept, "files_dropped": n_dropped, "dropped": DROP + [DROP_RE.pattern]},
        "project_files": n_src,
        "wheels": {w: why for w, why in zip(carried, WHEELS.values())},
        "standins": list(table["models"]),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    manifest["bytes"] = folder_size(out)
    if manifest["bytes"] > LIMIT:
        raise SystemExit(f"the kit is {manifest['bytes'] / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB limit")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the kit's folder (new or empty)")
    ap.add_argument("--models-cache", type=Path,
                    help="where the real models are (default: the project's model cache; fetched if missing)")
    args = ap.parse_args(argv)
    m = make_kit(args.out, models_cache=args.models_cache)
    for p in sorted(args.out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(args.out)}")
    print(f"{m['bytes'] / 2**20:8.2f} MiB  in all (limit {LIMIT / 2**20:.0f} MiB); llama-cpp-python {m['llama_cpp_python']}: "
          f"{m['sdist']['files_kept']} files kept, {m['sdist']['files_dropped']} dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
