"""The base model's layers on llama.cpp RPC servers (ggml-rpc), here on loopback: two
`python -m blendin_cpp rpc-server` processes hold the demo base, the guide stays local, and the
answers equal the all-local ones; unreachable servers, another protocol version and servers that
die during loading or mid-generation give clear errors, and the process goes on."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import blendin_cpp as bc
from blendin_cpp import _core
from blendin_cpp.demo import demo_path

def test_rpc_backend_is_built():
    """CI installs llama-cpp-python with -DGGML_RPC=on (README, docs/getting-started.md, .ci/run): every other test here needs it."""
    assert _core.rpc_available(), "llama-cpp-python was built without -DGGML_RPC=on"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until ggml's server says it listens (its banner ends with the transport line)."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"rpc-server on port {port} exited {proc.wait()}: {''.join(lines)}")
        lines.append(line)
        if "transport" in line:
            return
    raise RuntimeError(f"rpc-server on port {port} did not start: {''.join(lines)}")


class RpcServer:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "blendin_cpp", "rpc-server", "--port", str(self.port),
                                      "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_listening(self.port, self.proc)
        # drain its log, so that it never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def servers():
    started = [RpcServer(), RpcServer()]
    yield started
    for s in started:
        s.kill()


GREEDY = dict(max_tokens=24, temperature=0.0)
QUESTIONS = ["What is the capital of Gafashe?", "What is 12 + 34?"]


def test_base_split_over_two_servers_equals_all_local(servers):
    endpoints = [s.endpoint for s in servers]
    guide = bc.Model(demo_path("guide"), n_ctx=256, n_threads=1)
    remote = bc.Model(demo_path("base"), n_ctx=256, n_threads=1, rpc=endpoints)
    assert remote.rpc == endpoints
    assert sum(1 for name in remote.buffer_types if name.startswith("RPC")) == 2, remote.buffer_types
    local = bc.Model(demo_path("base"), n_ctx=256, n_threads=1)
    for q in QUESTIONS:
        want = bc.Blender(local, guide, method="blendin").complete([{"role": "user", "content": q}], **GREEDY)
        got = bc.Blender(remote, guide, method="blendin").complete([{"role": "user", "content": q}], **GREEDY)
        assert got.tokens == want.tokens and got.text == want.text
        assert got.stats["intervention_rate"] == want.stats["intervention_rate"]


def test_cli_generate_with_rpc_equals_local(servers):
    base = [sys.executable, "-m", "blendin_cpp", "generate", "--prompt", QUESTIONS[0], "--max-tokens", "16",
            "--temperature", "0", "--json", "--threads", "1"]
    local = subprocess.run(base, capture_output=True, text=True, timeout=300)
    remote = subprocess.run(base + ["--rpc", ",".join(s.endpoint for s in servers)], capture_output=True,
                            text=True, timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-2000:]
    assert json.loads(remote.stdout)["tokens"] == json.loads(local.stdout)["tokens"]


def test_unreachable_server_is_a_clear_error():
    port = free_port()  # nothing listens there
    with pytest.raises(ValueError, match=rf"RPC server '127.0.0.1:{port}' is not reachable"):
        bc.Model(demo_path("base"), n_ctx=64, rpc=f"127.0.0.1:{port}")


@pytest.mark.parametrize("endpoint", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:http", ":50052"])
def test_malformed_endpoint_is_a_clear_error(endpoint):
    with pytest.raises(ValueError, match="HOST:PORT|port must be"):
        bc.Model(demo_path("base"), n_ctx=64, rpc=[endpoint])


def fake_server(answer: bytes | None):
    """A listener that reads ggml's HELLO and answers `answer` (None: closes at once)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(30)

    def serve():
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                if answer is not None:
                    conn.recv(1 + 8 + 24)
                    conn.sendall(answer)
                    time.sleep(0.5)
        except OSError:
            pass
        finally:
            listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def test_another_protocol_version_is_a_clear_error():
    endpoint = fake_server(struct.pack("<Q", 28) + bytes([6, 1, 0, 0]) + bytes(24))
    with pytest.raises(bc.BlendError, match=r"speaks protocol 6\.1\.0, this build 7\.0"):
        bc.Model(demo_path("base"), n_ctx=64, rpc=endpoint)


def test_a_server_that_hangs_up_at_the_handshake_is_a_clear_error():
    endpoint = fake_server(None)
    with pytest.raises(bc.BlendError, match="did not answer the handshake"):
        bc.Model(demo_path("base"), n_ctx=64, rpc=endpoint)


# ---- servers that die: in a child process, since an RPC failure ends RPC use in a process ----
DIES_MID_GENERATION = r'''
import json, sys
import blendin_cpp as bc
from blendin_cpp.demo import demo_path
guide = bc.Model(demo_path("guide"), n_ctx=256, n_threads=1)
remote = bc.Model(demo_path("base"), n_ctx=256, n_threads=1, rpc=sys.argv[1])
local = bc.Model(demo_path("base"), n_ctx=256, n_threads=1)
q = [{"role": "user", "content": "What is the capital of Gafashe?"}]
out = {"first": bc.Blender(remote, guide).complete(q, max_tokens=8, temperature=0.0).text}
print("ready", flush=True)
sys.stdin.readline()  # the parent kills the server, then says go
try:
    bc.Blender(remote, guide).complete(q, max_tokens=8, temperature=0.0)
    out["second"] = "no error"
except bc.BlendError as e:
    out["second"] = str(e)
out["local"] = bc.Blender(local, guide).complete(q, max_tokens=8, temperature=0.0).text
try:
    bc.Model(demo_path("base"), n_ctx=64, rpc=sys.argv[1])
    out["reload"] = "no error"
except (bc.BlendError, ValueError) as e:
    out["reload"] = str(e)
print(json.dumps(out), flush=True)
'''


def test_server_killed_mid_generation_raises_and_the_process_goes_on():
    server = RpcServer()
    child = subprocess.Popen([sys.executable, "-c", DIES_MID_GENERATION, server.endpoint], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
        server.kill()
        out, err = child.communicate("go\n", timeout=120)
    finally:
        child.kill()
        server.kill()
    assert child.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert "an RPC server failed while decoding" in result["second"]
    assert "Remote RPC server crashed" in result["second"] and ".cpp" not in result["second"]
    local = bc.Blender(bc.Model(demo_path("base"), n_ctx=256, n_threads=1),
                       bc.Model(demo_path("guide"), n_ctx=256, n_threads=1))
    want = local.complete([{"role": "user", "content": "What is the capital of Gafashe?"}], max_tokens=8,
                          temperature=0.0).text
    assert result["first"] == want and result["local"] == want
    assert "restart the process" in result["reload"]


class CuttingProxy:
    """Forwards one client's connections to a server, cutting them all once `limit` bytes went
    from client to server: a server that goes away in the middle of receiving the weights."""

    def __init__(self, target: int, limit: int):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(60)
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.target, self.limit, self.sent = target, limit, 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        try:
            for _ in range(64):  # bounded: the probe and ggml's connections (one per query while no buffer is held)
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target), timeout=60)
                self.conns += [client, server]
                threading.Thread(target=self.pump, args=(client, server, True), daemon=True).start()
                threading.Thread(target=self.pump, args=(server, client, False), daemon=True).start()
        except OSError:
            pass

    def pump(self, src, dst, upstream):
        cut = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if upstream:
                    self.sent += len(data)
                    if self.sent > self.limit:
                        cut = True
                        break
        except OSError:
            pass
        if not cut:
            for c in (src, dst):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return
        # the server is gone, as a killed process goes: its connections reset (closed with unread
        # data, no linger), later connections refused
        self.listener.close()
        for c in self.conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
            except OSError:
                pass


DIES_WHILE_LOADING = r'''
import sys
import blendin_cpp as bc
from blendin_cpp.demo import demo_path
try:
    bc.Model(demo_path("base"), n_ctx=64, n_threads=1, rpc=sys.argv[1])
    print("no error")
except (bc.BlendError, ValueError) as e:
    print(e)
guide = bc.Model(demo_path("guide"), n_ctx=64, n_threads=1)
print("local", len(guide.logits(guide.tokenize("Hello"))))
'''


def test_server_lost_while_loading_raises_and_the_process_goes_on():
    server = RpcServer()
    try:
        proxy = CuttingProxy(server.port, limit=200_000)  # the demo base sends a few MB of weights
        child = subprocess.run([sys.executable, "-c", DIES_WHILE_LOADING, proxy.endpoint], capture_output=True,
                               text=True, timeout=120)
    finally:
        server.kill()
    assert child.returncode == 0, child.stderr[-2000:]
    first, second = child.stdout.strip().splitlines()[-2:]
    assert "an RPC server failed while loading" in first and "Remote RPC server crashed" in first, child.stdout
    assert second.startswith("local ")


KILLED_THEN_FREED = r'''
import sys
import blendin_cpp as bc
from blendin_cpp.demo import demo_path
remote = bc.Model(demo_path("base"), n_ctx=64, n_threads=1, rpc=sys.argv[1])
remote.logits(remote.tokenize("Hello"))
print("ready", flush=True)
sys.stdin.readline()
del remote  # its server is gone: freeing must not wait for it
print("freed", flush=True)
'''


def test_a_model_whose_server_died_is_freed_without_hanging():
    server = RpcServer()
    child = subprocess.Popen([sys.executable, "-c", KILLED_THEN_FREED, server.endpoint], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
        server.kill()
        out, err = child.communicate("go\n", timeout=60)
    finally:
        child.kill()
        server.kill()
    assert child.returncode == 0 and out.strip() == "freed", err[-2000:]
