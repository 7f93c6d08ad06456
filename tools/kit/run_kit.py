"""The GPU kit's work on the GPU machine (started by run.sh; standard library only, no network).

    bash run.sh OUT [--cpu] [--arch SM] [--work DIR] [--budget SECONDS]

Phases, each with its own time limit inside the whole budget, each logged: environment, unpack
(the project, the trimmed llama-cpp-python, the wheels into a prefix), build (llama-cpp-python
for this GPU, or for the CPU with --cpu), install (blendin_cpp against that build), stand-ins (the
real models' shapes with random weights), gpu-tests (tests/test_gpu.py), the benchmarks
(bench/run.py on the two stand-in pairs and on the demo pair, bench/parallel.py), then the report.
A failed or timed-out phase is recorded and the phases that do not need it still run; the report
is written whatever happens: OUT/report.md, OUT/report.json and OUT/logs.tar.gz (every log).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

KIT = Path(__file__).resolve().parent
REPORT_RESERVE = 20  # seconds kept for writing the report

# The build's flags, and why (docs/gpu.md): one GPU architecture, flash-attention kernels for the
# KV types blendin_cpp offers (f16, q8_0) instead of llama.cpp's default four, no NCCL (one GPU), no
# mtmd/tools/tests/examples/server: only the libraries blendin_cpp links. RPC stays on, as in the
# project's standard build.
COMMON_FLAGS = ["-DGGML_RPC=on", "-DLLAVA_BUILD=off", "-DLLAMA_BUILD_TESTS=off", "-DLLAMA_BUILD_EXAMPLES=off",
                "-DLLAMA_BUILD_TOOLS=off", "-DLLAMA_BUILD_SERVER=off"]
CUDA_FLAGS = ["-DGGML_CUDA=on", "-DGGML_CUDA_FA_QUANTS=f16-f16,q8_0-q8_0", "-DGGML_CUDA_NCCL=off"]

# (phase, seconds on a GPU machine, seconds with --cpu): the GPU column fits 9 minutes on a
# 16-core machine; each phase also stops where the whole budget ends.
LIMITS = {
    "environment": (30, 60),
    "unpack": (60, 120),
    "build": (360, 2400),
    "install": (150, 900),
    "standins": (90, 600),
    "gpu-tests": (150, 900),
    "bench-qwen": (100, 900),
    "bench-real": (100, 900),
    "bench-parallel": (100, 900),
    "bench-demo": (60, 600),
}


class Run:
    def __init__(self, args):
        self.args = args
        self.out = args.out.resolve()
        self.work = (args.work or self.out / "work").resolve()
        self.logs = self.work / "logs"
        self.prefix = self.work / "prefix"
        self.src = self.work / "src" / "blendin_cpp"
        self.standins = self.work / "standins"
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.phases: list[dict] = []
        self.facts: dict = {"mode": "cpu" if args.cpu else "gpu", "budget_s": args.budget,
                            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        self.jobs = os.cpu_count() or 1
        self.lib_path: list[str] = []  # folders the built libraries need at run time (cublas_hints)

    # ---- running things ----
    def say(self, msg: str) -> None:
        m, s = divmod(int(time.monotonic() - self.t0), 60)
        print(f"[{m:02d}:{s:02d}] {msg}", flush=True)

    def env(self) -> dict:
        env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(self.prefix), *filter(None, [os.environ.get("PYTHONPATH")])]),
                   BLENDIN_CPP_STANDINS=str(self.standins), BLENDIN_CPP_CACHE=str(self.work / "model-cache"))
        env["PATH"] = os.pathsep.join([str(self.prefix / "bin"), env.get("PATH", "")])
        if self.lib_path:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.lib_path, *filter(None, [env.get("LD_LIBRARY_PATH")])])
        return env

    def run(self, name: str, cmd: list[str], *, log: Path, timeout: float, cwd: Path | None = None,
            env: dict | None = None, stdout: Path | None = None) -> int:
        """One command, its output appended to `log` (stdout to `stdout` if given); killed with its
        process group at `timeout`. Returns its exit status (124 on timeout)."""
        with open(log, "a") as err, open(stdout or log, "a") as out:
            err.write(f"$ {' '.join(cmd)}\n")
            err.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env(), stdout=out,
                                    stderr=err if stdout else subprocess.STDOUT, start_new_session=True)
            try:
                return proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                err.write(f"\n[run_kit] {name}: killed after {timeout:.0f} s\n")
                return 124

    def phase(self, name: str, fn, *, needs: tuple[str, ...] = ()) -> bool:
        limit = LIMITS[name][1 if self.args.cpu else 0]
        left = self.deadline - time.monotonic() - REPORT_RESERVE
        rec = {"phase": name, "limit_s": limit, "log": f"logs/{name}.log"}
        self.phases.append(rec)
        if self.args.phases and name not in self.args.phases and name != "environment":
            # not asked for: an earlier run in the same --work may have left what it makes
            made = self.made(name)
            rec.update(status="reused" if made else "skipped", why="from an earlier run" if made else "not asked for")
            self.say(f"{name}: {rec['status']} ({rec['why']})")
            return made
        failed = [n for n in needs if self.status(n) not in ("ok", "reused")]
        if failed:
            rec.update(status="skipped", why=f"needs {', '.join(failed)}")
            self.say(f"{name}: skipped ({rec['why']})")
            return False
        if left < 10:
            rec.update(status="skipped", why="the budget is spent")
            self.say(f"{name}: skipped (the budget is spent)")
            return False
        timeout = min(limit, left)
        self.say(f"{name}: started (limit {timeout:.0f} s)")
        log = self.logs / f"{name}.log"
        t = time.monotonic()
        try:
            rc = fn(log, timeout)
        except Exception as e:  # a bug or a missing file here must not cost the report
            with open(log, "a") as f:
                f.write(f"\n[run_kit] {name}: {type(e).__name__}: {e}\n")
            rc = 1
        rec["seconds"] = round(time.monotonic() - t, 1)
        rec["status"] = "ok" if rc == 0 else "timed out" if rc == 124 else "failed"
        rec["rc"] = rc
        self.say(f"{name}: {rec['status']} in {rec['seconds']:.0f} s")
        if rc != 0 and log.exists():
            for line in log.read_text(errors="replace").splitlines()[-15:]:
                print(f"    | {line}", flush=True)
        self.write_report()  # after every phase: a run killed from outside still leaves one
        return rc == 0

    def made(self, name: str) -> bool:
        """Whether the work folder holds what phase `name` makes (for --phases)."""
        if name == "unpack":
            return (self.src / "pyproject.toml").exists() and self.prefix.is_dir()
        if name == "build":
            return any((self.prefix / "llama_cpp" / "lib").glob("libllama.*"))
        if name == "install":
            return (self.prefix / "blendin_cpp").is_dir()
        if name == "standins":
            table = json.loads((KIT / "standins" / "standins.json").read_text())
            return all((self.standins / f"{n}.gguf").exists() and (self.standins / f"{n}.gguf").stat().st_size == m["size"]
                       for n, m in table["models"].items())
        return False

    def status(self, name: str) -> str | None:
        return next((p["status"] for p in self.phases if p["phase"] == name), None)

    def left(self, timeout: float, t_start: float) -> float:
        return timeout - (time.monotonic() - t_start)

    # ---- the phases ----
    def environment(self, log: Path, timeout: float) -> int:
        f = self.facts
        f.update(python=sys.version.split()[0], python_path=sys.executable, cpus=self.jobs, machine=platform.machine(),
                 cpu=next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                          platform.processor()))
        for key, cmd in (("gpu", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                                  "--format=csv,noheader"]),
                         ("nvcc", ["nvcc", "--version"]), ("cmake", ["cmake", "--version"]),
                         ("ninja", ["ninja", "--version"])):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                lines = (r.stdout or r.stderr).strip().splitlines()
                # nvcc --version: the line that says "release 13.0, V13.0.88"; the others: their first line
                f[key] = next((ln for ln in lines if "release" in ln), lines[0] if lines else "") if key == "nvcc" \
                    else (lines[0] if lines else "")
            except (OSError, subprocess.TimeoutExpired) as e:
                f[key] = f"not available ({e.__class__.__name__})"
        with open(log, "w") as out:
            out.write(json.dumps(f, indent=1) + "\n")
        missing = []
        for mod in ("numpy", "nanobind", "scikit_build_core", "pytest", "jinja2", "httpx"):
            r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
            if r.returncode:
                missing.append(mod)
        if missing:
            with open(log, "a") as out:
                out.write(f"this Python lacks {', '.join(missing)} (the kit carries only what a CUDA image lacks)\n")
            return 1
        if not self.args.cpu and "not available" in f["gpu"] + f["nvcc"]:
            with open(log, "a") as out:
                out.write("no GPU (nvidia-smi) or no CUDA compiler (nvcc): run with --cpu for a CPU rehearsal\n")
            return 1
        return 0

    def unpack(self, log: Path, timeout: float) -> int:
        for folder in (self.prefix, self.work / "src", self.work / "llama"):
            shutil.rmtree(folder, ignore_errors=True)
        self.prefix.mkdir(parents=True)
        (sdist,) = KIT.glob("llama_cpp_python-*.tar.gz")
        for archive, dest in ((KIT / "blendin_cpp-src.tar.gz", self.work / "src"), (sdist, self.work / "llama")):
            with tarfile.open(archive) as t:
                t.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        wheels = sorted(str(p) for p in (KIT / "wheels").glob("*.whl"))
        return self.run("unpack", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                                   "--target", str(self.prefix), *wheels], log=log, timeout=timeout)

    def cmake_args(self) -> str:
        if self.args.cpu:
            return " ".join(["-DGGML_CUDA=off", *COMMON_FLAGS])
        arch = self.args.arch
        if arch is None:  # this GPU's compute capability, e.g. "9.0" -> 90
            cap = self.facts.get("gpu", "").split(",")[-1].strip()
            arch = cap.replace(".", "") if re.fullmatch(r"\d+\.\d+", cap) else None
        self.facts["cuda_architectures"] = f"{arch}-real" if arch else "native"
        return " ".join([*CUDA_FLAGS, f"-DCMAKE_CUDA_ARCHITECTURES={self.facts['cuda_architectures']}", *COMMON_FLAGS,
                         *self.cublas_hints()])

    def cublas_hints(self) -> list[str]:
        """CMake arguments that point at cuBLAS where the CUDA toolkit has none of its own but pip's
        nvidia packages do (some images carry nvcc and the runtime only); [] where CMake finds it."""
        nvcc = shutil.which("nvcc")
        root = Path(nvcc).resolve().parents[1] if nvcc else Path("/usr/local/cuda")
        standard = [root / "lib64", *root.glob("targets/*/lib"), Path("/usr/lib/x86_64-linux-gnu")]
        if any(any(d.glob("libcublas.so*")) for d in standard if d.is_dir()):
            return []
        import site
        for sp in {*site.getsitepackages(), *sys.path}:
            nvidia = Path(sp) / "nvidia"
            libs = sorted(nvidia.glob("**/libcublas.so*")) if nvidia.is_dir() else []
            heads = sorted(nvidia.glob("**/cublas_v2.h")) if libs else []
            lts = sorted(nvidia.glob("**/libcublasLt.so*")) if heads else []
            if lts:
                self.facts["cublas"] = f"from pip's nvidia packages: {libs[0]}"
                self.lib_path.append(str(libs[0].parent))
                return [f"-DCUDA_cublas_LIBRARY={libs[0]}", f"-DCUDA_cublasLt_LIBRARY={lts[0]}",
                        f"-DCMAKE_CUDA_FLAGS=-I{heads[0].parent}"]
        return []

    def build(self, log: Path, timeout: float) -> int:
        (folder,) = (self.work / "llama").iterdir()
        args = self.cmake_args()
        self.facts["cmake_args"] = args
        env = dict(self.env(), CMAKE_ARGS=args, CMAKE_GENERATOR="Ninja", CMAKE_BUILD_PARALLEL_LEVEL=str(self.jobs))
        t = time.monotonic()
        rc = self.run("build", [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-index",
                                "--no-deps", "--no-cache-dir", "--target", str(self.prefix), str(folder)],
                      log=log, timeout=timeout, env=env)
        self.facts["build_s"] = round(time.monotonic() - t, 1)
        if rc:
            return rc
        # the backends built (llama_supports_gpu_offload would say yes for the RPC backend alone)
        probe = ("import llama_cpp, pathlib; lib = pathlib.Path(llama_cpp.__file__).parent / 'lib'; "
                 "print(llama_cpp.__version__, ' '.join(sorted(p.name for p in lib.glob('libggml-*.so'))))")
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env())
        with open(log, "a") as f:
            f.write(f"[run_kit] llama_cpp: {r.stdout.strip()} {r.stderr.strip()[-2000:]}\n")
        self.facts["llama_cpp"] = r.stdout.strip()
        if r.returncode:
            return r.returncode
        if not self.args.cpu and "libggml-cuda.so" not in r.stdout:
            with open(log, "a") as f:
                f.write("[run_kit] no libggml-cuda.so: the CUDA backend did not build\n")
            return 1
        return 0

    def install(self, log: Path, timeout: float) -> int:
        env = dict(self.env(), CMAKE_GENERATOR="Ninja", CMAKE_BUILD_PARALLEL_LEVEL=str(self.jobs))
        rc = self.run("install", [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-index",
                                  "--no-deps", "--no-cache-dir", "--target", str(self.prefix), str(self.src)],
                      log=log, timeout=timeout, env=env)
        if rc:
            return rc
        probe = "from blendin_cpp.model import default_gpu_layers, gpu_devices; print(gpu_devices(), default_gpu_layers())"
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env(),
                           cwd=self.work)
        with open(log, "a") as f:
            f.write(f"[run_kit] blendin_cpp sees GPU offload: {r.stdout.strip()} {r.stderr.strip()[-2000:]}\n")
        self.facts["blendin_cpp_gpu_offload"] = r.stdout.strip()
        if r.returncode == 0:
            self.import_order_probe(log)
        return r.returncode

    def import_order_probe(self, log: Path) -> None:
        """Record whether blendin_cpp imports after llama_cpp has started its backends (a first GPU
        run crashed there); with a backtrace where gdb exists. A finding, not a failure."""
        code = "import llama_cpp; llama_cpp.llama_backend_init(); import blendin_cpp; print('ok')"
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                           env=self.env(), cwd=self.work, timeout=60)
        self.facts["import_after_backend_init"] = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
        with open(log, "a") as f:
            f.write(f"[run_kit] llama_cpp's backends started, then import blendin_cpp: exit {r.returncode}\n"
                    f"{r.stdout[-1000:]}{r.stderr[-3000:]}\n")
            if r.returncode and shutil.which("gdb"):
                g = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", code],
                                   capture_output=True, text=True, env=self.env(), cwd=self.work, timeout=120)
                f.write(f"[run_kit] gdb:\n{g.stdout[-6000:]}\n")

    def make_standins(self, log: Path, timeout: float) -> int:
        table = json.loads((KIT / "standins" / "standins.json").read_text())
        self.standins.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        for name, m in table["models"].items():
            out = self.standins / f"{name}.gguf"
            rc = self.run("standins", [sys.executable, "-X", "faulthandler", str(self.src / "bench" / "standins.py"), "make",
                                       str(KIT / "standins" / f"{name}.header.xz"), str(m["size"]), str(out)],
                          log=log, timeout=self.left(timeout, t))
            if rc:
                return rc
        return 0

    def pair(self, name: str) -> tuple[str, str]:
        table = json.loads((KIT / "standins" / "standins.json").read_text())
        p = table["pairs"][name]
        return str(self.standins / f"{p['base']}.gguf"), str(self.standins / f"{p['guide']}.gguf")

    def gpu_tests(self, log: Path, timeout: float) -> int:
        xml = self.logs / "gpu-tests.xml"
        # only pytest's own plugins (an image's Python may carry others that load libraries first), and
        # a Python traceback should anything crash
        env = dict(self.env(), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        return self.run("gpu-tests", [sys.executable, "-X", "faulthandler", "-m", "pytest", "-v", "-rs",
                                      "-p", "no:cacheprovider", f"--junitxml={xml}", "tests/test_gpu.py"],
                        log=log, timeout=timeout, cwd=self.src, env=env)

    def bench_sizes(self) -> dict:
        # on a CPU (the rehearsal) the same commands on a token budget: they show that everything runs
        return dict(tokens=8, repeats=1, clients="1,2", requests=2, max_tokens=8, prompts=1) if self.args.cpu else \
            dict(tokens=64, repeats=3, clients="1,4,8,16", requests=16, max_tokens=32, prompts=2)

    def bench_pair(self, pair: str, log: Path, timeout: float) -> int:
        s = self.bench_sizes()
        base, guide = self.pair(pair)
        prompts = self.work / "bench-prompts.jsonl"
        lines = (self.src / "models" / "real" / "bench_prompts.jsonl").read_text().splitlines()
        prompts.write_text("\n".join([x for x in lines if x.strip()][:s["prompts"]]) + "\n")
        return self.run(f"bench-{pair}", [sys.executable, "bench/run.py", "--base", base, "--guide", guide,
                                          "--prompts", str(prompts), "--no-http", "--calibrate-gamma",
                                          "--tokens", str(s["tokens"]), "--repeats", str(s["repeats"]),
                                          "--threads", str(min(8, self.jobs)),
                                          "--json", str(self.logs / f"bench-{pair}.json")],
                        log=log, timeout=timeout, cwd=self.src, stdout=self.logs / f"bench-{pair}.out")

    def bench_parallel(self, log: Path, timeout: float) -> int:
        s = self.bench_sizes()
        if self.status("standins") == "ok":
            base, guide = self.pair("qwen")
        else:  # the demo pair, which travels
            base, guide = (str(self.src / "models" / "demo" / f"{r}.gguf") for r in ("base", "guide"))
        return self.run("bench-parallel", [sys.executable, "bench/parallel.py", "--base", base, "--guide", guide,
                                           "--clients", s["clients"], "--requests", str(s["requests"]),
                                           "--max-tokens", str(s["max_tokens"]), "--shorts", "2",
                                           "--long-tokens", str(4 * s["max_tokens"]),
                                           "--threads", str(min(8, self.jobs)),
                                           "--json", str(self.logs / "bench-parallel.json")],
                        log=log, timeout=timeout, cwd=self.src, stdout=self.logs / "bench-parallel.out")

    def bench_demo(self, log: Path, timeout: float) -> int:
        s = self.bench_sizes()
        return self.run("bench-demo", [sys.executable, "bench/run.py", "--pairs", "demo", "--no-http",
                                       "--demo-questions", str(4 * s["prompts"]), "--tokens", str(s["tokens"]),
                                       "--repeats", str(s["repeats"]), "--threads", str(min(8, self.jobs)),
                                       "--json", str(self.logs / "bench-demo.json")],
                        log=log, timeout=timeout, cwd=self.src, stdout=self.logs / "bench-demo.out")

    # ---- the report ----
    def tests_summary(self) -> dict | None:
        xml = self.logs / "gpu-tests.xml"
        if not xml.exists():
            return None
        cases = []
        for tc in ET.parse(xml).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for child in tc:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    detail = (child.get("message") or "")[:300]
            cases.append({"test": tc.get("name"), "outcome": outcome, "seconds": float(tc.get("time") or 0),
                          "detail": detail})
        return {"cases": cases, **{k: sum(c["outcome"] == k for c in cases)
                                   for k in ("passed", "failed", "error", "skipped")}}

    def write_report(self) -> None:
        self.facts["total_s"] = round(time.monotonic() - self.t0, 1)
        benches = {}
        for name in ("qwen", "real", "parallel", "demo"):
            path = self.logs / f"bench-{name}.json"
            if path.exists():
                benches[name] = json.loads(path.read_text())
        report = {"facts": self.facts, "phases": self.phases, "tests": self.tests_summary(), "bench": benches}
        (self.out / "report.json").write_text(json.dumps(report, indent=1))
        f = self.facts
        md = [f"# blendin_cpp GPU kit report ({f['mode']} mode)", "",
              f"- started {f['started_utc']} UTC, {f['total_s']:.0f} s in all (budget {f['budget_s']} s)",
              f"- GPU: {f.get('gpu', '?')}", f"- CUDA compiler: {f.get('nvcc', '?')}; {f.get('cmake', '?')}; "
              f"ninja {f.get('ninja', '?')}",
              f"- CPU: {f.get('cpus', '?')} x {f.get('cpu', '?')}; Python {f.get('python', '?')}",
              f"- llama-cpp-python build: {f.get('build_s', '?')} s with CMAKE_ARGS=\"{f.get('cmake_args', '?')}\"",
              f"- llama_cpp version and backends: {f.get('llama_cpp', '?')}",
              f"- blendin_cpp's GPUs and default n_gpu_layers: {f.get('blendin_cpp_gpu_offload', '?')}",
              "", "## Phases", "",
              "| phase | status | seconds | limit s | note |", "|---|---|---|---|---|"]
        for p in self.phases:
            md.append(f"| {p['phase']} | {p['status']} | {p.get('seconds', '-')} | {p['limit_s']} | {p.get('why', '')} |")
        t = report["tests"]
        if t:
            md += ["", f"## tests/test_gpu.py: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
                       f"{t['skipped']} skipped", "", "| test | outcome | seconds | detail |", "|---|---|---|---|"]
            for c in t["cases"]:
                md.append(f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {c['detail'].replace('|', '/')} |")
        for name in ("qwen", "real", "parallel", "demo"):
            out = self.logs / f"bench-{name}.out"
            if out.exists() and out.read_text().strip():
                md += ["", f"## bench-{name}", "", "```", out.read_text().rstrip(), "```"]
        md += ["", "Every log is in logs.tar.gz."]
        (self.out / "report.md").write_text("\n".join(md) + "\n")
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")

    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.say(f"blendin_cpp GPU kit: {self.facts['mode']} mode, work in {self.work}, budget {self.args.budget} s")
        try:
            self.phase("environment", self.environment)
            self.phase("unpack", self.unpack, needs=("environment",))
            self.phase("build", self.build, needs=("unpack",))
            self.phase("install", self.install, needs=("build",))
            self.phase("standins", self.make_standins, needs=("install",))
            # the GPU tests and the batching bench run without stand-ins too (on the demo pair)
            self.phase("gpu-tests", self.gpu_tests, needs=("install",))
            self.phase("bench-parallel", self.bench_parallel, needs=("install",))
            self.phase("bench-demo", self.bench_demo, needs=("install",))
            self.phase("bench-qwen", lambda log, t: self.bench_pair("qwen", log, t), needs=("standins",))
            self.phase("bench-real", lambda log, t: self.bench_pair("real", log, t), needs=("standins",))
        finally:
            self.write_report()
            self.say(f"report: {self.out / 'report.md'}, {self.out / 'report.json'}, {self.out / 'logs.tar.gz'}")
        return 0 if all(p["status"] == "ok" for p in self.phases) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="where report.md, report.json and logs.tar.gz go")
    ap.add_argument("--cpu", action="store_true", help="build without CUDA (a rehearsal on any machine)")
    ap.add_argument("--arch", help="CUDA architecture, e.g. 90 (default: this GPU's, from nvidia-smi)")
    ap.add_argument("--work", type=Path, help="scratch folder: sources, build, prefix, stand-ins (default: OUT/work)")
    ap.add_argument("--budget", type=float, help="seconds for everything (default: 540, or 7200 with --cpu)")
    ap.add_argument("--phases", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                    help="run only these phases (comma-separated; the environment always runs); the others' "
                         "products (sources, builds, stand-ins) are reused from an earlier run in the same --work")
    args = ap.parse_args(argv)
    unknown = set(args.phases or ()) - set(LIMITS)
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(sorted(unknown))}; the phases: {', '.join(LIMITS)}")
    if args.budget is None:
        args.budget = 7200 if args.cpu else 540
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
