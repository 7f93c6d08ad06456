// One thread at a time: an object that holds llama.cpp state (a Model's KV cache, an Engine's
// generation) is leased by the thread that uses it; another thread that tries meanwhile gets an
// Error instead of undefined behaviour. The same thread may nest leases.
//
// Reads of such state from outside (what a sequence holds, the statistics, a logits row) follow
// the same rule through a Lease::Read: while another thread is inside a call on the object the
// read raises the same error; otherwise it copies a consistent state. A read never makes the
// thread that uses the object fail: a use that begins while a read is copying waits for the copy
// (a read holds nothing else and never waits, so this cannot deadlock).
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

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

    // A short read: copy what is needed inside it, and call nothing that uses the object.
    class Read {
    public:
        Read(Lease& lease, const std::string& what) : lease_(lease) { lease_.begin_read(what); }
        ~Read() { lease_.end_read(); }
        Read(const Read&) = delete;
        Read& operator=(const Read&) = delete;

    private:
        Lease& lease_;
    };

private:
    static Error busy(const std::string& what) {
        return Error(what + " is in use by another thread: it serves one call at a time (serialize the calls, "
                     "or give each thread its own)");
    }
    bool used_elsewhere() const { return depth_ > 0 && owner_ != std::this_thread::get_id(); }

    void enter(const std::string& what) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (used_elsewhere()) throw busy(what);
        owner_ = std::this_thread::get_id();
        // claimed first, so that no new read starts; then the reads already copying finish
        if (++depth_ == 1) readers_done_.wait(lock, [this] { return readers_ == 0; });
    }
    void leave() {
        std::lock_guard<std::mutex> lock(mutex_);
        --depth_;
    }
    void begin_read(const std::string& what) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (used_elsewhere()) throw busy(what);
        if (depth_ == 0) ++readers_;  // a thread inside its own call reads its own state freely
        else ++own_reads_;
    }
    void end_read() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (own_reads_ > 0 && depth_ > 0 && owner_ == std::this_thread::get_id()) {
            --own_reads_;
            return;
        }
        if (--readers_ == 0) readers_done_.notify_all();
    }

    std::mutex mutex_;
    std::condition_variable readers_done_;
    std::thread::id owner_;
    int depth_ = 0;
    int readers_ = 0;    // reads copying while nobody uses the object
    int own_reads_ = 0;  // reads by the user itself, inside its call
};

// Holds several leases for one call (an engine and its models, the models of best-of-N), taken in
// the order they are added.
class Holding {
public:
    void add(Lease& lease, const std::string& what) { scopes_.push_back(std::make_unique<Lease::Scope>(lease, what)); }

private:
    std::vector<std::unique_ptr<Lease::Scope>> scopes_;
};

}  // namespace blendin
