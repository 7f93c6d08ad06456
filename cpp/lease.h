// One thread at a time: an object that holds llama.cpp state (a Model's KV cache, an Engine's
// generation) is leased by the thread that uses it; another thread that tries meanwhile gets an
// Error instead of undefined behaviour. The same thread may nest leases.
#pragma once

#include <mutex>
#include <string>
#include <thread>

#include "error.h"

namespace blendin {

class Lease {
public:
    // `what` names the object in the error message.
    class Scope {
    public:
        Scope(Lease& lease, const std::string& what) : lease_(lease) { lease_.enter(what); }
        ~Scope() { lease_.leave(); }
        Scope(const Scope&) = delete;
        Scope& operator=(const Scope&) = delete;

    private:
        Lease& lease_;
    };

private:
    void enter(const std::string& what) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (depth_ > 0 && owner_ != std::this_thread::get_id())
            throw Error(what + " is in use by another thread: it serves one call at a time (serialize the calls, "
                        "or give each thread its own)");
        owner_ = std::this_thread::get_id();
        ++depth_;
    }
    void leave() {
        std::lock_guard<std::mutex> lock(mutex_);
        --depth_;
    }

    std::mutex mutex_;
    std::thread::id owner_;
    int depth_ = 0;
};

}  // namespace blendin
