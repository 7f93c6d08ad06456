// llama.cpp's RPC backend (ggml-rpc), reached through ggml's backend registry so that a
// llama-cpp-python built without it still loads and runs everything local.
//
// ggml-rpc aborts the process when a server is unreachable, speaks another protocol version, or
// dies mid-computation (GGML_ABORT, often on its own dispatcher thread). So: servers are probed
// here (connect and handshake, with timeouts) before ggml sees them, and every llama.cpp call that
// may talk to a server runs through `guarded`, which turns that abort into an Error in the caller.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "ggml-backend.h"

namespace blendin::rpc {

// Whether this llama.cpp build has the RPC backend (llama-cpp-python with -DGGML_RPC=on).
bool available();

// The devices of the servers at these "host:port" endpoints, in order, after checking that each
// answers ggml's handshake with this build's protocol version. Throws ValueError/Error naming the
// endpoint and the problem.
std::vector<ggml_backend_dev_t> devices(const std::vector<std::string>& endpoints);

// Run fn (llama.cpp calls that may reach a server) on a helper thread. If a server fails
// meanwhile, ggml's abort is caught: fn's thread is parked for good and an Error naming `what` is
// thrown here. After a failure every guarded call throws at once (ggml cannot tell which server
// failed, and its connections to it are gone): a process must be restarted to use RPC again.
void guarded(const std::string& what, const std::function<void()>& fn);

// The first RPC failure of this process ("" if none).
std::string failure();

// ggml's own RPC server on this machine's CPU: serves clients one at a time until the process ends.
void serve(const std::string& endpoint, const std::string& cache_dir, int n_threads);

// A loaded model's claim on its servers: while one holds an endpoint, this process has a
// connection open to it, and ggml's server answers one client at a time, so no probe is sent.
class Hold {
public:
    Hold() = default;
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;
    ~Hold();
    void take(const std::vector<std::string>& endpoints);
    const std::vector<std::string>& endpoints() const { return endpoints_; }
    bool empty() const { return endpoints_.empty(); }

private:
    std::vector<std::string> endpoints_;
};

}  // namespace blendin::rpc
