#include "rpc.h"

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "error.h"
#include "ggml.h"

#if __has_include("ggml-rpc.h")
#include "ggml-rpc.h"
#endif
#ifndef RPC_PROTO_MAJOR_VERSION  // the protocol of the pinned llama.cpp, for builds without the header
#define RPC_PROTO_MAJOR_VERSION 7
#define RPC_PROTO_MINOR_VERSION 0
#endif

#ifndef _WIN32
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#endif

namespace blendin::rpc {
namespace {

constexpr const char* kBuildHint =
    "this llama-cpp-python was built without llama.cpp's RPC backend: reinstall it with "
    "CMAKE_ARGS=\"-DGGML_RPC=on\" pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36 "
    "(--no-cache-dir: pip would otherwise reuse the wheel it built before)";

ggml_backend_reg_t registry() {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (!reg) throw ValueError(kBuildHint);
    return reg;
}

template <class F>
F proc(const char* name) {
    auto f = reinterpret_cast<F>(ggml_backend_reg_get_proc_address(registry(), name));
    if (!f) throw Error(std::string("llama.cpp's RPC backend has no ") + name);
    return f;
}

// ---- failure: ggml's abort, caught ----
std::mutex g_mutex;
std::condition_variable g_changed;
std::string g_failure;
std::map<std::string, int> g_held;  // endpoint -> loaded models holding connections to it

void on_abort(const char* message) {
    const std::string text = message ? message : "";
    if (text.find("RPC") == std::string::npos && text.find("Failed to connect") == std::string::npos) {
        std::fprintf(stderr, "%s\n", text.c_str());  // not ours to catch: ggml aborts as it always does
        return;
    }
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        if (g_failure.empty()) {
            g_failure = text;
            while (!g_failure.empty() && (g_failure.back() == '\n' || g_failure.back() == ' ')) g_failure.pop_back();
            // "path/ggml-rpc.cpp:569: Remote RPC server crashed ...": the message without the source line
            if (auto at = g_failure.find(".cpp:"); at != std::string::npos)
                if (auto colon = g_failure.find(": ", at); colon != std::string::npos) g_failure = g_failure.substr(colon + 2);
        }
    }
    g_changed.notify_all();
    // Returning would abort the process. This thread (ggml's dispatcher, or a guarded call's
    // helper) is parked instead; its caller has been told, and nothing will use it again.
    for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
}

void install_abort_handler() {
    static std::once_flag once;
    std::call_once(once, [] { ggml_set_abort_callback(on_abort); });
}

void check_not_failed() {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_failure.empty())
        throw Error("an RPC server failed earlier in this process (" + g_failure +
                    "); restart the process to use RPC servers again (local models still work)");
}

#ifndef _WIN32
// Connect and run ggml's HELLO handshake, with timeouts, so that ggml never meets an unreachable
// server or another protocol version (it aborts on both).
struct Fd {
    int fd = -1;
    ~Fd() { if (fd >= 0) close(fd); }
};

bool wait_for(int fd, short events, int ms) {
    pollfd p{fd, events, 0};
    return poll(&p, 1, ms) == 1 && !(p.revents & (POLLERR | POLLNVAL));
}

bool send_all(int fd, const uint8_t* data, size_t n, int ms) {
    while (n > 0) {
        if (!wait_for(fd, POLLOUT, ms)) return false;
        ssize_t k = send(fd, data, n, MSG_NOSIGNAL);
        if (k <= 0) return false;
        data += k;
        n -= static_cast<size_t>(k);
    }
    return true;
}

bool recv_all(int fd, uint8_t* data, size_t n, int ms) {
    while (n > 0) {
        if (!wait_for(fd, POLLIN, ms)) return false;
        ssize_t k = recv(fd, data, n, 0);
        if (k <= 0) return false;
        data += k;
        n -= static_cast<size_t>(k);
    }
    return true;
}

void probe(const std::string& endpoint, const std::string& host, const std::string& port) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0 || !found)
        throw ValueError("RPC server '" + endpoint + "': cannot resolve the host '" + host + "'");
    std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(found, freeaddrinfo);
    Fd s;
    s.fd = socket(found->ai_family, found->ai_socktype, found->ai_protocol);
    if (s.fd < 0) throw Error("RPC server '" + endpoint + "': cannot create a socket");
    fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) | O_NONBLOCK);
    int rc = connect(s.fd, found->ai_addr, found->ai_addrlen);
    int err = 0;
    socklen_t len = sizeof err;
    if (rc != 0 && (errno != EINPROGRESS || !wait_for(s.fd, POLLOUT, 5000) ||
                    getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0))
        throw ValueError("RPC server '" + endpoint + "' is not reachable (" +
                         std::strerror(err ? err : (errno ? errno : ETIMEDOUT)) +
                         "); start it there with: python -m blendin_cpp rpc-server --host HOST --port " + port);
    // HELLO: command 14, the size of the request (8 bytes, little-endian), 24 bytes of capabilities
    // (none); the answer: its size (8 bytes) then major, minor, patch, padding and 24 bytes.
    uint8_t hello[1 + 8 + 24] = {14, 24};
    uint8_t size[8], answer[4 + 24];
    if (!send_all(s.fd, hello, sizeof hello, 5000) || !recv_all(s.fd, size, sizeof size, 10000))
        throw Error("RPC server '" + endpoint + "' accepted the connection but did not answer the handshake "
                    "within 10 s (ggml's rpc-server serves one client at a time: is another one using it? or it "
                    "speaks another protocol version)");
    uint64_t n = 0;
    std::memcpy(&n, size, sizeof n);
    if (n != sizeof answer || !recv_all(s.fd, answer, sizeof answer, 10000))
        throw Error("RPC server '" + endpoint + "' answered the handshake with " + std::to_string(n) +
                    " bytes instead of " + std::to_string(sizeof answer) + ": another protocol version (this build speaks " +
                    std::to_string(RPC_PROTO_MAJOR_VERSION) + "." + std::to_string(RPC_PROTO_MINOR_VERSION) + ")");
    if (answer[0] != RPC_PROTO_MAJOR_VERSION || answer[1] > RPC_PROTO_MINOR_VERSION)
        throw Error("RPC server '" + endpoint + "' speaks protocol " + std::to_string(answer[0]) + "." +
                    std::to_string(answer[1]) + "." + std::to_string(answer[2]) + ", this build " +
                    std::to_string(RPC_PROTO_MAJOR_VERSION) + "." + std::to_string(RPC_PROTO_MINOR_VERSION) +
                    ": install the same blendin_cpp (and llama-cpp-python) version on both machines");
}
#endif

void split(const std::string& endpoint, std::string& host, std::string& port) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size())
        throw ValueError("RPC server '" + endpoint + "' must be written HOST:PORT (for example 192.168.1.20:50052)");
    host = endpoint.substr(0, colon);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    port = endpoint.substr(colon + 1);
    char* end = nullptr;
    long p = std::strtol(port.c_str(), &end, 10);
    if (*end != '\0' || p < 1 || p > 65535)
        throw ValueError("RPC server '" + endpoint + "': the port must be a number in 1..65535");
}

}  // namespace

bool available() { return ggml_backend_reg_by_name("RPC") != nullptr; }

std::string failure() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_failure;
}

void Hold::take(const std::vector<std::string>& endpoints) {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (const auto& e : endpoints) ++g_held[e];
    endpoints_ = endpoints;
}

Hold::~Hold() {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (const auto& e : endpoints_) --g_held[e];
}

std::vector<ggml_backend_dev_t> devices(const std::vector<std::string>& endpoints) {
    auto add_server = proc<ggml_backend_reg_t (*)(const char*)>("ggml_backend_rpc_add_server");
    install_abort_handler();
    check_not_failed();
    std::vector<ggml_backend_dev_t> out;
    for (const std::string& endpoint : endpoints) {
        std::string host, port;
        split(endpoint, host, port);
        bool held;
        {
            std::lock_guard<std::mutex> lock(g_mutex);
            held = g_held[endpoint] > 0;
        }
#ifndef _WIN32
        if (!held) probe(endpoint, host, port);
#endif
        ggml_backend_reg_t reg = nullptr;
        guarded("connecting to the RPC server '" + endpoint + "'", [&] { reg = add_server(endpoint.c_str()); });
        if (!reg || ggml_backend_reg_dev_count(reg) == 0)
            throw Error("RPC server '" + endpoint + "' offers no device");
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) out.push_back(ggml_backend_reg_dev_get(reg, i));
    }
    return out;
}

void guarded(const std::string& what, const std::function<void()>& fn) {
    check_not_failed();
    struct State {
        bool done = false;
        std::exception_ptr error;
    };
    auto state = std::make_shared<State>();
    std::thread([state, fn] {
        std::exception_ptr error;
        try {
            fn();
        } catch (...) {
            error = std::current_exception();
        }
        {
            std::lock_guard<std::mutex> lock(g_mutex);
            state->done = true;
            state->error = error;
        }
        g_changed.notify_all();
    }).detach();
    std::unique_lock<std::mutex> lock(g_mutex);
    g_changed.wait(lock, [&] { return state->done || !g_failure.empty(); });
    if (state->done) {
        if (state->error) std::rethrow_exception(state->error);
        return;
    }
    throw Error("an RPC server failed while " + what + ": " + g_failure +
                " (the process goes on; models on RPC servers cannot be used again until it restarts)");
}

void serve(const std::string& endpoint, const std::string& cache_dir, int n_threads) {
    auto start = proc<void (*)(const char*, const char*, size_t, size_t, ggml_backend_dev_t*)>(
        "ggml_backend_rpc_start_server");
    std::string host, port;
    split(endpoint, host, port);
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) throw Error("llama.cpp has no CPU device to serve");
    const unsigned threads = n_threads > 0 ? n_threads : std::max(1u, std::thread::hardware_concurrency());
    start(endpoint.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(), threads, 1, &cpu);
    throw Error("ggml's RPC server stopped: it could not listen on '" + endpoint + "' (is the port in use?)");
}

}  // namespace blendin::rpc
