// Continuous batching: many generations at once on one engine's models, each in its own KV
// sequence (its slot), all advanced by one token per step with one batched decode per model and
// phase. Requests wait in a queue (first come, first served) and join at the next step where a
// slot is free; a finished or cancelled one leaves at once. Each request is a Sequence (engine.h),
// exactly as a single generation is, so its tokens are the ones the request would get alone (bit
// for bit with deterministic models: see docs/server.md, "Batching and rounding").
//
// One step: the waiting requests join free slots, every running request decides its token with
// decide_tokens (engine.h: the phases a single generation also runs, as a batch of one; a lazy
// guide catches up on everything it skipped in its one batch), then emits it; the finished leave.
// A slot keeps what its sequence holds after its request leaves: a request whose prompt extends
// it (the next turn of a chat) is given that slot and reads only the new tokens.
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"

namespace blendin {

class Scheduler {
public:
    struct Event {
        long id;
        Step step;
        Stats stats;        // of the finished request, when step.finish_reason is set
        std::string error;  // the step failed for this request, which has ended ("": it did not)
        bool invalid = false;  // the error is the request's own (its parameters or input: a ValueError)
    };

    // `n_slots` sequences of every model (at most their n_seq_max), each holding at most
    // `slot_ctx` tokens (the request's context; the models' cells are shared by all slots). The
    // sequences above the slots are emptied here and before each admission: their cells are the
    // slots' (a batch with more sequences, best-of-N say, may have left them full).
    Scheduler(Engine& engine, int n_slots, int slot_ctx);

    // Queue a generation; returns its id. Checks the parameters (Engine::check) and that the
    // prompts fit a slot; speculative verification is not used in a batch (the tokens are the same
    // for greedy decoding; sampled tokens follow the same distribution from another stream).
    long add(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& params);
    // A waiting or running request leaves now (its slot is free at the next step); unknown ids
    // (finished already) are ignored.
    void cancel(long id);
    // Admit waiting requests to free slots, then decide one token for every running request. An
    // error in one request's decision ends that request alone; one in a batched decode ends the
    // requests of that batch.
    std::vector<Event> step();

    int n_slots() const { return static_cast<int>(slots_.size()); }
    int slot_ctx() const { return slot_ctx_; }
    int running() const;
    int waiting() const { return static_cast<int>(queue_.size()); }
    bool idle() const { return running() == 0 && queue_.empty(); }

private:
    struct Request {
        long id;
        std::vector<Token> prompts[kRoles];
        GenParams params;
        std::chrono::steady_clock::time_point queued;
    };
    struct Slot : Sequence {
        long id = -1;  // the request it runs, -1: free
        std::vector<float> rows[kRoles];  // the logits after target (a bridged guide: mapped probabilities)
        bool fresh[kRoles] = {};          // rows[r] is current for target[r]
        std::chrono::steady_clock::time_point queued, t_first;
        bool started = false;  // its first token was decided
    };

    class Batch;  // the running slots as Sequences (engine.h)
    void admit();
    void empty_other_sequences();
    void start(Slot& slot, int seq, Request&& r);
    // The request in slot i ends with error e (an event for it).
    void fail(int i, const std::exception& e, std::vector<Event>& events);
    Stats finish(Slot& slot);

    Engine& engine_;
    Model* models_[kRoles] = {};
    int slot_ctx_;
    std::vector<Slot> slots_;  // slot i is sequence i of every model
    std::deque<Request> queue_;
    long next_id_ = 1;
    std::vector<float> guide_p_;
    mutable Lease lease_;
};

}  // namespace blendin
