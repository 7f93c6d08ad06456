#include "scheduler.h"

#include <algorithm>

#include "distribution.h"
#include "error.h"
#include "policy.h"

namespace blendin {

namespace {
double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

size_t common_prefix(const std::vector<Token>& a, const std::vector<Token>& b) {
    return std::mismatch(a.begin(), a.end(), b.begin(), b.end()).first - a.begin();
}
}  // namespace

Scheduler::Scheduler(Engine& engine, int n_slots, int slot_ctx) : engine_(engine), slot_ctx_(slot_ctx) {
    for (int r = 0; r < kRoles; ++r) models_[r] = engine.models_[r];
    if (n_slots < 1) throw ValueError("parallel must be at least 1, got " + std::to_string(n_slots));
    if (slot_ctx < 2) throw ValueError("the context per request must hold at least 2 tokens, got " + std::to_string(slot_ctx));
    for (Model* m : models_) {
        if (!m) continue;
        if (n_slots > m->n_seq_max())
            throw ValueError(std::to_string(n_slots) + " requests at once need " + std::to_string(n_slots) +
                             " sequences, but " + m->name() + " was loaded with n_seq_max = " +
                             std::to_string(m->n_seq_max()));
        if (slot_ctx > m->n_ctx_seq())
            throw ValueError("requests of " + std::to_string(slot_ctx) + " tokens need as many KV cells per sequence, but " +
                             m->name() + " has " + std::to_string(m->n_ctx_seq()) + " (n_ctx " +
                             std::to_string(m->n_ctx()) + " / n_seq_max " + std::to_string(m->n_seq_max()) +
                             "; load it with n_ctx = n_seq_max x context)");
    }
    slots_.resize(n_slots);
    empty_other_sequences();
    if (engine.bridged()) guide_p_.resize(models_[kGuide]->n_vocab());
}

int Scheduler::running() const {
    Lease::Read read(lease_, "this scheduler");
    return static_cast<int>(std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.id >= 0; }));
}

long Scheduler::add(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& params) {
    Lease::Scope use(lease_, "this scheduler");
    engine_.check_prompts(base_prompt, guide_prompt, params);
    const Method m = params.policy.method;
    const bool use_role[kRoles] = {uses_base(m), uses_guide(m), uses_anti(m)};
    const std::vector<Token>* prompts[kRoles] = {&base_prompt, &guide_prompt, &guide_prompt};
    for (int r = 0; r < kRoles; ++r)
        if (use_role[r] && static_cast<int>(prompts[r]->size()) >= slot_ctx_)
            throw ValueError(std::string("the ") + role_name(r) + " prompt has " + std::to_string(prompts[r]->size()) +
                             " tokens, which leaves no room in the context of " + std::to_string(slot_ctx_) +
                             " tokens per request (shorten the prompt or raise the context)");
    Request req{next_id_++, {}, params, std::chrono::steady_clock::now()};
    for (int r = 0; r < kRoles; ++r)
        if (use_role[r]) req.prompts[r] = *prompts[r];
    req.params.speculative = Speculative::Off;  // see the header
    queue_.push_back(std::move(req));
    return queue_.back().id;
}

void Scheduler::cancel(long id) {
    Lease::Scope use(lease_, "this scheduler");
    for (auto it = queue_.begin(); it != queue_.end(); ++it)
        if (it->id == id) {
            queue_.erase(it);
            return;
        }
    for (Slot& s : slots_)
        if (s.id == id) {
            s.id = -1;
            s.decoder.reset();
        }
}

void Scheduler::empty_other_sequences() {
    for (Model* m : models_)
        if (m)
            for (int seq = n_slots(); seq < m->n_seq_max(); ++seq)
                if (!m->tokens(seq).empty()) m->truncate(seq, 0);
}

void Scheduler::admit() {
    if (!queue_.empty()) empty_other_sequences();
    while (!queue_.empty()) {
        Request& r = queue_.front();
        // the free slot whose sequence shares the longest prefix with the prompt (a chat's next turn)
        const int role = r.prompts[kBase].empty() ? kGuide : kBase;
        int best = -1;
        size_t best_common = 0;
        for (int i = 0; i < n_slots(); ++i) {
            if (slots_[i].id >= 0) continue;
            const size_t common = common_prefix(models_[role]->tokens(i), r.prompts[role]);
            if (best < 0 || common > best_common) {
                best = i;
                best_common = common;
            }
        }
        if (best < 0) return;
        start(slots_[best], best, std::move(r));
        queue_.pop_front();
    }
}

void Scheduler::start(Slot& s, int seq, Request&& r) {
    s.id = r.id;
    s.queued = r.queued;
    s.started = false;
    s.seq = seq;
    const std::vector<Token>* prompts[kRoles] = {&r.prompts[kBase], &r.prompts[kGuide], &r.prompts[kAnti]};
    s.start(models_, prompts, r.params, *engine_.facts_, engine_.bridged());
    for (int k = 0; k < kRoles; ++k) {
        s.ctx[k] = slot_ctx_;
        s.fresh[k] = false;
    }
}

void Scheduler::fail(int i, const std::exception& e, std::vector<Event>& events) {
    Slot& s = slots_[i];
    events.push_back(Event{s.id, Step{}, Stats{}, e.what(), dynamic_cast<const ValueError*>(&e) != nullptr});
    s.id = -1;
    s.decoder.reset();
}

Stats Scheduler::finish(Slot& s) {
    Stats st = decoder_stats(*s.decoder);
    s.count(st, models_);
    const auto now = std::chrono::steady_clock::now();
    st.prefill_s = seconds(s.t_first - s.queued);  // waiting and reading the prompt, to the first token
    st.generate_s = seconds(now - s.t_first);
    st.tokens_per_s = st.generate_s > 0 ? (st.tokens - 1) / st.generate_s : 0;
    s.id = -1;
    s.decoder.reset();
    return st;
}

// The running slots as Sequences: a failed read or decision ends that slot's request alone.
class Scheduler::Batch : public Sequences {
public:
    Batch(Scheduler& s, std::vector<Event>& events) : s_(s), events_(events) {}
    Decoder* decoder(int i) override { return s_.slots_[i].id >= 0 ? s_.slots_[i].decoder.get() : nullptr; }
    bool uses(int i, int role) const override { return s_.slots_[i].use[role]; }
    // Bring model r of the given slots up to their targets (one batched decode) and copy the rows.
    void fetch(int r, const std::vector<int>& which) override {
        Model* model = s_.models_[r];
        if (!model || which.empty()) return;
        const bool bridged = r == kGuide && s_.engine_.bridged();
        std::vector<Model::SyncRequest> requests;
        std::vector<int> owner;
        for (int i : which) {
            Slot& s = s_.slots_[i];
            if (s.id < 0 || s.fresh[r]) continue;
            if (bridged) {  // the guide reads the text so far through its own tokenizer (see Engine::guide_logits)
                try {
                    read_text(*s.retokenizer, *s.decoder, s.guide_prompt, s_.slot_ctx_, s.target[r]);
                } catch (const std::exception& e) {
                    s_.fail(i, e, events_);
                    continue;
                }
            }
            requests.push_back({i, &s.target[r]});
            owner.push_back(i);
        }
        const int nv = model->n_vocab(), n_base = s_.engine_.n_vocab();
        try {
            model->sync_all(requests, [&](size_t k, const float* row) {
                Slot& s = s_.slots_[owner[k]];
                if (bridged) {
                    softmax(row, nv, s_.guide_p_.data());
                    s.rows[r].resize(n_base);
                    s.unmatched = s_.engine_.bridge_->map_probs(s_.guide_p_.data(), s.rows[r].data(), n_base);
                } else {
                    s.rows[r].assign(row, row + nv);
                }
                s.fresh[r] = true;
            });
        } catch (const std::exception& e) {  // a batched decode that failed: its requests are undecided
            for (int i : owner) s_.fail(i, e, events_);
        }
    }
    const float* row(int i, int role) override { return s_.slots_[i].rows[role].data(); }
    float unmatched(int i) const override { return s_.slots_[i].unmatched; }
    void guard(int i, const std::function<void()>& decide) override {
        try {
            decide();
        } catch (const std::exception& e) {
            s_.fail(i, e, events_);
        }
    }

private:
    Scheduler& s_;
    std::vector<Event>& events_;
};

std::vector<Scheduler::Event> Scheduler::step() {
    Holding hold;
    hold.add(lease_, "this scheduler");
    hold.add(engine_.lease_, "this Blender");
    for (Model* m : models_)
        if (m) hold.add(m->lease(), m->name());
    admit();
    std::vector<Event> events;
    std::vector<int> live;
    for (int i = 0; i < n_slots(); ++i)
        if (slots_[i].id >= 0) live.push_back(i);
    if (live.empty()) return events;
    Batch batch(*this, events);
    decide_tokens(batch, live);
    // every request emits its token; the finished leave
    const auto now = std::chrono::steady_clock::now();
    const bool bridged = engine_.bridged();
    for (int i : live) {
        Slot& s = slots_[i];
        if (s.id < 0) continue;  // ended by an error
        try {
            if (!s.started) {
                s.started = true;
                s.t_first = now;
            }
            Step& st = s.decoder->decided();
            const bool finished = s.emit(st, *engine_.facts_, bridged);
            Event ev{s.id, std::move(st), Stats{}, ""};
            if (finished)
                ev.stats = finish(s);
            else
                for (bool& f : s.fresh) f = false;
            events.push_back(std::move(ev));
        } catch (const std::exception& e) {  // this request alone ends
            fail(i, e, events);
        }
    }
    return events;
}

}  // namespace blendin
