#include "engine.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "error.h"

namespace blendin {

namespace {
const char* kRoleNames[kRoles] = {"base", "guide", "anti"};

double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

size_t common_prefix(const std::vector<Token>& a, const std::vector<Token>& b) {
    return std::mismatch(a.begin(), a.end(), b.begin(), b.end()).first - a.begin();
}

constexpr const char* kEngineName = "this Blender";

// This thread holds the engine and its models for one call: another thread gets an Error.
class Hold : public Holding {
public:
    Hold(Lease& engine, Model* const* models) {
        add(engine, kEngineName);
        for (int r = 0; r < kRoles; ++r)
            if (models[r]) add(models[r]->lease(), models[r]->name());
    }
};
}  // namespace

const char* role_name(int role) { return kRoleNames[role]; }

void read_text(Retokenizer& rt, const Decoder& d, const std::vector<Token>& prompt, int ctx, std::vector<Token>& target) {
    const std::vector<Token>& read = rt.tokens(d.text(), d.readable_text());
    if (prompt.size() + read.size() > static_cast<size_t>(ctx))
        throw ValueError("the guide reads the text as " + std::to_string(read.size()) + " tokens after its " +
                         std::to_string(prompt.size()) + "-token prompt, which do not fit its context of " +
                         std::to_string(ctx) + " tokens (raise the context)");
    target = prompt;
    target.insert(target.end(), read.begin(), read.end());
}

// ---- Sequence ----
void Sequence::start(Model* const* models, const std::vector<Token>* const* prompts, const GenParams& p,
                     const TokenFacts& facts, bool bridged) {
    const Method m = p.policy.method;
    use[kBase] = uses_base(m);
    use[kGuide] = uses_guide(m);
    use[kAnti] = uses_anti(m);
    decoder = std::make_unique<Decoder>(p, facts, p.sampling.seed, bridged);
    unmatched = 0;
    if (bridged && use[kGuide]) {
        guide_prompt = *prompts[kGuide];
        if (!retokenizer) retokenizer = std::make_unique<Retokenizer>(*models[kGuide]);
        retokenizer->reset();
    }
    for (int r = 0; r < kRoles; ++r) {
        prompt[r] = reused[r] = 0;
        target[r].clear();
        if (!models[r]) continue;
        calls0[r] = models[r]->decode_calls();
        tokens0[r] = models[r]->decoded_tokens();
        if (!use[r]) continue;
        target[r] = *prompts[r];
        prompt[r] = static_cast<long>(target[r].size());
        const size_t common = common_prefix(models[r]->tokens(seq), target[r]);
        const bool current = common == target[r].size() && models[r]->logits_after(seq, common);
        reused[r] = static_cast<long>(std::min(common, target[r].size() - (current ? 0 : 1)));
    }
}

bool Sequence::room(Token next, const TokenFacts& facts, bool bridged) const {
    for (int r = 0; r < kRoles; ++r)
        if (use[r] && !(r == kGuide && bridged) && static_cast<int>(target[r].size()) >= ctx[r]) return false;
    if (!bridged || !use[kGuide]) return true;
    // a guide that re-reads the text: its tokens of the text with `next`, counted exactly only when
    // the cheap bound comes near its context
    const size_t limit = static_cast<size_t>(ctx[kGuide]) - guide_prompt.size();
    return retokenizer->fits(decoder->text(), facts.base->text_piece(next), limit);
}

bool Sequence::emit(Step& step, const TokenFacts& facts, bool bridged, bool in_kv) {
    const Token t = step.token;
    const bool finished = decoder->emit(step, in_kv || facts.eog[t] || room(t, facts, bridged));
    if (!finished && !in_kv)
        for (int r = 0; r < kRoles; ++r)
            if (use[r] && !(r == kGuide && bridged)) target[r].push_back(t);
    return finished;
}

void Sequence::count(Stats& s, Model* const* models) const {
    for (int r = 0; r < kRoles; ++r) {
        if (!models[r]) continue;
        s.prompt_tokens[r] = prompt[r];
        s.reused_tokens[r] = reused[r];
        // the models' decodes while it ran (in a batch: shared with the sequences batched with it)
        s.decode_calls[r] = models[r]->decode_calls() - calls0[r];
        s.decoded_tokens[r] = models[r]->decoded_tokens() - tokens0[r];
    }
}

void check_prompt(int role, const Model& model, const std::vector<Token>& prompt) {
    if (prompt.empty()) throw ValueError(std::string("the ") + kRoleNames[role] + " prompt is empty");
    model.check_tokens(prompt);
    if (static_cast<int>(prompt.size()) >= model.n_ctx_seq())
        throw ValueError(std::string("the ") + kRoleNames[role] + " prompt has " + std::to_string(prompt.size()) +
                         " tokens, which leaves no room in its context of " + std::to_string(model.n_ctx_seq()) +
                         " tokens (shorten the prompt or raise n_ctx)");
}

void decide_tokens(Sequences& seqs, const std::vector<int>& live) {
    auto with = [&](const std::vector<int>& from, auto&& keep) {  // the sequences of `from` still in, that keep(d, i)
        std::vector<int> out;
        for (int i : from)
            if (Decoder* d = seqs.decoder(i); d && keep(*d, i)) out.push_back(i);
        return out;
    };
    auto each = [&](const std::vector<int>& which, auto&& decide) {
        for (int i : which)
            if (Decoder* d = seqs.decoder(i)) seqs.guard(i, [&] { decide(*d, i); });
    };
    for (int r = 0; r < kRoles; ++r)  // the naive loop: every model reads every token
        seqs.fetch(r, with(live, [&](Decoder& d, int i) { return !d.params().lazy && seqs.uses(i, r); }));
    // 1. nudged words go on where the guide keeps writing
    std::vector<int> words = with(live, [](Decoder& d, int) { return d.in_word(); });
    std::vector<int> rest = with(live, [](Decoder& d, int) { return !d.in_word(); });
    seqs.fetch(kGuide, words);
    each(words, [&](Decoder& d, int i) {
        if (!d.continue_word(seqs.row(i, kGuide), seqs.unmatched(i))) rest.push_back(i);
    });
    // 2. the gates, from the base's rows
    seqs.fetch(kBase, with(rest, [&](Decoder&, int i) { return seqs.uses(i, kBase); }));
    std::vector<int> consulted;
    each(rest, [&](Decoder& d, int i) {
        if (d.gate(seqs.uses(i, kBase) ? seqs.row(i, kBase) : nullptr)) consulted.push_back(i);
    });
    auto consults = [&](int i) { return std::find(consulted.begin(), consulted.end(), i) != consulted.end(); };
    // 3. the guides (and antis) the gates consult, one batch per model
    auto reads_guide = [&](Decoder& d, int i) { return consults(i) && seqs.uses(i, kGuide) && !d.guide_read(); };
    seqs.fetch(kGuide, with(rest, reads_guide));
    seqs.fetch(kAnti, with(rest, [&](Decoder&, int i) { return consults(i) && seqs.uses(i, kAnti); }));
    each(rest, [&](Decoder& d, int i) {
        d.decide(reads_guide(d, i) ? seqs.row(i, kGuide) : nullptr,
                 consults(i) && seqs.uses(i, kAnti) ? seqs.row(i, kAnti) : nullptr, seqs.unmatched(i));
    });
}

// The engine's one sequence as a batch of one: `read(role)` gives a model's row, read once per token.
class Engine::One : public Sequences {
public:
    One(Engine& e, std::function<const float*(int)> read) : e_(e), read_(std::move(read)) {}
    Decoder* decoder(int) override { return e_.seq_.decoder.get(); }
    bool uses(int, int role) const override { return e_.used(role); }
    void fetch(int role, const std::vector<int>& which) override {
        if (!which.empty() && !rows_[role]) rows_[role] = read_(role);
    }
    const float* row(int, int role) override { return rows_[role]; }
    float unmatched(int) const override { return e_.unmatched(); }

private:
    Engine& e_;
    std::function<const float*(int)> read_;
    const float* rows_[kRoles] = {};
};

std::vector<const float*> Engine::verify(int role, const std::vector<Token>& drafts, std::vector<float>& row0) {
    Model* model = models_[role];
    std::vector<Token>& target = seq_.target[role];
    std::vector<const float*> rows;
    std::vector<BatchItem> batch;
    const size_t common = common_prefix(model->tokens(0), target);
    const float* current = common == target.size() ? model->logits_after(0, common) : nullptr;
    if (current) {
        row0.assign(current, current + model->n_vocab());  // the next decode replaces it
        rows.push_back(row0.data());
    } else {
        // everything unread but its last token first, then that token with the drafts
        const size_t from = std::min(common, target.size() - 1);
        model->truncate(0, static_cast<int>(from));
        model->extend(0, target.data() + from, target.size() - 1 - from, false);
        batch.push_back({target.back(), 0, true});
    }
    for (Token d : drafts) batch.push_back({d, 0, true});
    model->decode(batch);
    for (int i = 0; i < model->n_logits(); ++i) rows.push_back(model->logits(i));
    target.insert(target.end(), drafts.begin(), drafts.end());
    return rows;
}

// ---- Engine ----
Engine::Engine(Model* base, Model* guide, Model* anti) {
    BLENDIN_CHECK(base != nullptr);
    Model* models[kRoles] = {base, guide, anti};
    n_vocab_ = base->n_vocab();
    for (int r = 1; r < kRoles; ++r)
        if (models[r] && (models[r] == base || (r == kAnti && models[r] == guide)))
            throw ValueError(std::string("the ") + kRoleNames[r] + " must be a separate Model object (each keeps its own KV cache)");
    if (guide) bridge_ = std::make_unique<VocabBridge>(*base, *guide);
    if (anti) {  // proxy-tuning subtracts logits token by token: the anti must share the base's tokens
        VocabBridge check(*base, *anti, "anti");
        if (!check.identity())
            throw ValueError("the base and the anti do not share a vocabulary: " + check.first_difference());
    }
    for (int r = 0; r < kRoles; ++r) models_[r] = models[r];
    facts_ = std::make_unique<TokenFacts>(*base, guide && !bridged() ? guide : nullptr);
    if (bridged()) {
        guide_p_.resize(guide->n_vocab());
        guide_mapped_.resize(n_vocab_);
    }
}

bool Engine::used(int role) const { return seq_.decoder && seq_.use[role]; }

// The guide's next-token row on the base vocabulary: its logits, or for a guide with its own
// tokenizer its probabilities mapped by the bridge, after it read the generated text through
// that tokenizer (as a full tokenization would split it, so that text the guide would merge
// differently is merged its way; only the unsettled tail is tokenized again).
const float* Engine::guide_logits() {
    if (!bridged()) return logits(kGuide);
    read_text(*seq_.retokenizer, *seq_.decoder, seq_.guide_prompt, seq_.ctx[kGuide], seq_.target[kGuide]);  // decoding checks room() first
    softmax(logits(kGuide), models_[kGuide]->n_vocab(), guide_p_.data());
    seq_.unmatched = bridge_->map_probs(guide_p_.data(), guide_mapped_.data(), n_vocab_);
    return guide_mapped_.data();
}

std::vector<Token> Engine::tokens(int role) const {
    if (role < 0 || role >= kRoles) throw ValueError("role must be 0 (base), 1 (guide) or 2 (anti)");
    Lease::Read read(lease_, kEngineName);
    return seq_.target[role];
}

bool Engine::is_end(Token t) const {
    if (t < 0 || t >= n_vocab_) models_[kBase]->check_tokens({t});  // throws, naming the vocabulary
    return facts_->eog[t];
}

void Engine::check(const GenParams& p) const {
    validate(p);
    const Method m = p.policy.method;
    const bool use[kRoles] = {uses_base(m), uses_guide(m), uses_anti(m)};
    for (int r = 0; r < kRoles; ++r)
        if (use[r] && !models_[r])
            throw ValueError(std::string("method '") + method_name(m) + "' needs a " + kRoleNames[r] + " model" +
                             (r == kAnti ? " (the guide's untuned sibling, for proxy-tuning)" : ""));
    if (!bridged()) return;
    // A guide with another vocabulary gives probabilities mapped onto the base's tokens, after
    // reading the text through its own tokenizer: it has no logits on the base's tokens to add
    // or subtract, and it cannot write base tokens as drafts nor score drafted base tokens in a
    // batch. The base alone (n-gram drafts) does not read it.
    if (m == Method::Proxy || m == Method::DeRa)
        throw ValueError(std::string("method '") + method_name(m) +
                         "' combines logits token by token and needs a guide that shares the base's vocabulary: " +
                         bridge_->first_difference());
    if (p.speculative != Speculative::Off && (use[kGuide] || p.drafter == Drafter::Guide))
        throw ValueError(std::string("speculative verification (method '") + method_name(m) + "', drafter '" +
                         (p.drafter == Drafter::Guide ? "guide" : "ngram") +
                         "') drafts base tokens and verifies them in batches, which a guide with another vocabulary "
                         "cannot take part in (only method 'base' with drafter 'ngram' leaves the guide out); it "
                         "needs a guide that shares the base's vocabulary: " +
                         bridge_->first_difference());
}

void Engine::reset() {
    Hold hold(lease_, models_);
    for (Model* m : models_)
        if (m) m->truncate(-1, 0);
    active_ = false;
    queue_.clear();
}

void Engine::check_prompts(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& p) {
    check(p);
    const Method m = p.policy.method;
    const bool use[kRoles] = {uses_base(m), uses_guide(m), uses_anti(m)};
    const std::vector<Token>* prompts[kRoles] = {&base_prompt, &guide_prompt, &guide_prompt};
    for (int r = 0; r < kRoles; ++r)
        if (use[r]) check_prompt(r, *models_[r], *prompts[r]);
}

void Engine::start(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt, const GenParams& p) {
    Hold hold(lease_, models_);
    check_prompts(base_prompt, guide_prompt, p);
    const std::vector<Token>* prompts[kRoles] = {&base_prompt, &guide_prompt, &guide_prompt};
    queue_.clear();
    draft_len_ = std::min(4, p.draft_max);
    drafted_ = accepted_ = 0;
    plain_steps_ = 0;
    could_pay_ = -1;
    // speculative auto: what was learnt of the pair's acceptance and pace carries over to the next
    // generation that drafts the same way
    const Decoder* last = seq_.decoder.get();
    if (p.speculative != Speculative::Auto || !last || last->params().speculative != Speculative::Auto ||
        last->params().policy.method != p.policy.method || last->params().drafter != p.drafter) {
        accept_ema_ = 0.8;
        plain_pace_ = spec_pace_ = Pace{};
    }
    t_start_ = std::chrono::steady_clock::now();
    seq_.start(models_, prompts, p, *facts_, bridged());
    for (int r = 0; r < kRoles; ++r) {
        if (!seq_.use[r]) continue;
        seq_.ctx[r] = models_[r]->n_ctx_seq();
        // the engine runs sequence 0: free the cells other sequences (best-of-N) left behind
        for (int s = 1; s < models_[r]->n_seq_max(); ++s) models_[r]->truncate(s, 0);
    }
    // the base is needed at once; a lazy guide reads its prompt the first time it is asked
    for (int r = 0; r < kRoles; ++r)
        if (seq_.use[r] && (r == kBase || !p.lazy)) r == kGuide ? guide_logits() : logits(r);
    t_first_ = std::chrono::steady_clock::now();
    active_ = true;
}

bool Engine::step(Step& out) {
    Hold hold(lease_, models_);
    if (queue_.empty()) {
        if (!active_) return false;
        const int k = draft_length();
        const auto t0 = std::chrono::steady_clock::now();
        if (k > 0) {
            speculate(k);
            plain_steps_ = 0;
        } else {
            plain_step();
            ++plain_steps_;
        }
        // the pace of each way, in seconds per emitted token, for speculative="auto"
        const double per_token = seconds(std::chrono::steady_clock::now() - t0) / static_cast<double>(queue_.size());
        (k > 0 ? spec_pace_ : plain_pace_).add(per_token);
    }
    out = std::move(queue_.front());
    queue_.pop_front();
    return true;
}

// ---- scoring (teacher forcing) ----
namespace {
// How many logits rows one model keeps at a time while scoring (64 MB of floats per model).
constexpr size_t kScoreFloats = size_t(1) << 24;
}  // namespace

void Engine::read_rows(int role, const std::vector<Token>& prompt, const std::vector<Token>& cont, size_t a, size_t b,
                       std::vector<float>& rows) {
    Model& m = *models_[role];
    // the row for position i comes from reading token i of prompt + continuation[:i], counted from the prompt's last
    std::vector<Token> seq(prompt);
    seq.insert(seq.end(), cont.begin(), cont.begin() + (b - 1));
    const size_t first = prompt.size() - 1 + a;  // the sequence must hold seq[:first] before this batch
    const std::vector<Token>& have = m.tokens(0);
    const size_t common = std::min(common_prefix(have, seq), first);
    m.truncate(0, static_cast<int>(common));
    m.extend(0, seq.data() + common, first - common, false);
    std::vector<BatchItem> items;
    for (size_t k = first; k < seq.size(); ++k) items.push_back({seq[k], 0, true});
    const size_t nv = m.n_vocab();
    rows.resize((b - a) * nv);
    m.decode_all(items, [&](size_t i, const float* row) { std::copy(row, row + nv, rows.begin() + i * nv); });
}

std::vector<Step> Engine::score(const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt,
                                const std::vector<Token>& cont, const GenParams& params) {
    Model* const* models = models_;
    Hold hold(lease_, models);
    check_prompts(base_prompt, guide_prompt, params);
    models[kBase]->check_tokens(cont);
    GenParams p = params;
    p.ignore_eos = false;  // every token of the continuation keeps the probability the policy gives it
    const Method m = p.policy.method;
    const bool use[kRoles] = {uses_base(m), uses_guide(m), uses_anti(m)};
    const std::vector<Token>* prompts[kRoles] = {&base_prompt, &guide_prompt, &guide_prompt};
    const bool batched[kRoles] = {use[kBase], use[kGuide] && !bridged(), use[kAnti]};
    for (int r = 0; r < kRoles && !cont.empty(); ++r)  // the last token is scored, not read
        if (batched[r] && prompts[r]->size() + cont.size() - 1 > static_cast<size_t>(models[r]->n_ctx()))
            throw ValueError(std::string("the ") + kRoleNames[r] + " prompt (" + std::to_string(prompts[r]->size()) +
                             " tokens) and the continuation (" + std::to_string(cont.size()) +
                             " tokens) do not fit its context of " + std::to_string(models[r]->n_ctx()) +
                             " tokens (raise n_ctx)");
    active_ = false;  // a generation in progress ends here
    queue_.clear();
    t_start_ = std::chrono::steady_clock::now();
    seq_.start(models, prompts, p, *facts_, bridged());
    for (int r = 0; r < kRoles; ++r) {
        if (!use[r]) continue;
        seq_.ctx[r] = models[r]->n_ctx_seq();
        seq_.reused[r] = std::min(seq_.reused[r], seq_.prompt[r] - 1);  // the prompt's last token is read again
        for (int s = 1; s < models[r]->n_seq_max(); ++s) models[r]->truncate(s, 0);  // free best-of-N's cells
    }
    t_first_ = t_start_;

    Decoder& d = *seq_.decoder;
    std::vector<Step> out;
    out.reserve(cont.size());
    std::vector<float> rows[kRoles];
    const size_t chunk = std::max<size_t>(1, kScoreFloats / static_cast<size_t>(n_vocab_));
    for (size_t a = 0; a < cont.size(); a += chunk) {
        const size_t b = std::min(cont.size(), a + chunk);
        for (int r = 0; r < kRoles; ++r)
            if (batched[r]) read_rows(r, *prompts[r], cont, a, b, rows[r]);
        for (size_t i = a; i < b; ++i) {
            One one(*this, [&](int r) -> const float* {
                if (r == kGuide && bridged()) return guide_logits();  // it re-reads the text where consulted
                return rows[r].data() + (i - a) * models[r]->n_vocab();
            });
            d.force(cont[i]);
            decide_tokens(one, {0});
            d.follow(d.decided());
            out.push_back(std::move(d.decided()));
        }
    }
    for (int r = 0; r < kRoles; ++r)
        if (batched[r]) seq_.target[r].insert(seq_.target[r].end(), cont.begin(), cont.end());
    t_end_ = std::chrono::steady_clock::now();
    return out;
}

// One token the plain way: the server's step on a batch of one (decide_tokens), then emit.
void Engine::plain_step() {
    One one(*this, [this](int r) { return r == kGuide ? guide_logits() : logits(r); });
    decide_tokens(one, {0});
    emit(seq_.decoder->decided(), false);
}

bool Engine::emit(Step& s, bool in_kv) {
    const bool finished = seq_.emit(s, *facts_, bridged(), in_kv);
    queue_.push_back(std::move(s));
    if (finished) {
        active_ = false;
        t_end_ = std::chrono::steady_clock::now();
    }
    return finished;
}

bool Engine::can_speculate() const {
    const GenParams& p = seq_.decoder->params();
    if (p.speculative == Speculative::Off || !p.lazy || (bridged() && used(kGuide))) return false;  // see check()
    switch (p.policy.method) {
        case Method::Nudging: case Method::BlendIn: case Method::Ensemble: case Method::Proxy: case Method::DeRa:
            return true;
        case Method::Base:  // the base alone verifies drafts looked up in its own context
            return p.drafter == Drafter::NGram;
        default:  // the guide alone needs no second opinion; a nudged word is the guide's anyway
            return false;
    }
}

// Seconds per emitted token of a round of k drafts at per-token acceptance a, over plain
// decoding's: below 1 the round pays. Plain decoding reads each token once per model (the lazy
// guide in batches); a round reads k + 1 positions in one batch per model, plus the drafter's cost.
double Engine::round_cost(int k, double a) {
    auto seconds = [this](int role, int n) { return used(role) ? models_[role]->decode_seconds(n) : 0.0; };
    const bool by_guide = seq_.decoder->params().drafter == Drafter::Guide;
    const double emitted = a >= 1 ? k + 1 : (1 - std::pow(a, k + 1)) / (1 - a);
    const double guide_read = seconds(kGuide, 8) / 8;
    const double plain = seconds(kBase, 1) + seconds(kAnti, 1) + guide_read;
    const double round = seconds(kBase, k + 1) + seconds(kAnti, k + 1) +
                         (by_guide ? k * seconds(kGuide, 1) : emitted * guide_read);
    return round / emitted / plain;
}

// How many tokens to draft now (0: decode this token plainly). `on`: always draft, the length
// adapting to what was accepted, pausing while acceptance is low. `auto`: never, when the
// measured batch costs say that no draft length could pay even at 95% acceptance (a CPU with a
// large base); otherwise the length whose cost pays most at the recent acceptance, as long as
// rounds keep a better pace (seconds per emitted token, measured) than plain steps; both ways
// are tried a few times first, and drafting again after 32 plain steps keeps the pace current.
int Engine::draft_length() {
    if (!can_speculate()) return 0;
    const GenParams& p = seq_.decoder->params();
    if (p.speculative == Speculative::On) return accept_ema_ < 0.5 && plain_steps_ < 16 ? 0 : draft_len_;
    if (could_pay_ < 0) {
        could_pay_ = 0;
        for (int k = 1; k <= p.draft_max && !could_pay_; ++k) could_pay_ = round_cost(k, 0.95) < 0.95;
    }
    if (!could_pay_) return 0;
    int best = 1;
    for (int k = 2; k <= p.draft_max; ++k)
        if (round_cost(k, accept_ema_) < round_cost(best, accept_ema_)) best = k;
    if (spec_pace_.n < 3) return best;
    if (plain_pace_.n < 3) return 0;
    return spec_pace_.seconds < plain_pace_.seconds || plain_steps_ >= 32 ? best : 0;
}

std::vector<Token> Engine::draft_with_guide(int k) {
    Sampler& sampler = seq_.decoder->sampler();
    if (guide_rows_.size() < static_cast<size_t>(k)) {
        guide_rows_.resize(k, std::vector<float>(n_vocab_));
        draft_q_.resize(k, std::vector<float>(n_vocab_));
    }
    std::vector<Token> drafts;
    for (int j = 0; j < k; ++j) {
        const float* lg = logits(kGuide);
        std::copy(lg, lg + n_vocab_, guide_rows_[j].begin());  // the next draft's decode replaces it
        Token d;
        if (sampler.greedy()) {
            d = argmax(lg, n_vocab_);
        } else {
            softmax(lg, n_vocab_, draft_q_[j].data());
            draft_q_[j] = sampler.shape(draft_q_[j].data(), n_vocab_);
            d = sampler.draw(draft_q_[j].data(), n_vocab_);
        }
        drafts.push_back(d);
        seq_.target[kGuide].push_back(d);
        if (facts_->eog[d]) break;
    }
    return drafts;
}

// Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
// n-gram (n = 3, 2, 1), up to k of them. Free to compute; often right where text is copied.
std::vector<Token> Engine::draft_from_context(int k) const {
    const std::vector<Token>& ctx = seq_.target[kBase];
    const size_t len = ctx.size();
    for (size_t n = std::min<size_t>(3, len - 1); n >= 1; --n) {
        for (size_t start = len - n; start-- > 0;) {
            if (!std::equal(ctx.begin() + start, ctx.begin() + start + n, ctx.end() - n)) continue;
            const size_t from = start + n;
            const size_t to = std::min(len, from + static_cast<size_t>(k));
            std::vector<Token> drafts(ctx.begin() + from, ctx.begin() + to);
            for (size_t i = 0; i < drafts.size(); ++i)
                if (facts_->eog[drafts[i]]) {
                    drafts.resize(i + 1);
                    break;
                }
            return drafts;
        }
    }
    return {};
}

// Speculative verification (docs/design.md section 4.2): a drafter proposes up to k tokens, the base
// (and the anti) score them in one batch, and the policy decides each drafted position from the
// models' logits there (Decoder::verify). Accepted tokens are already in the caches; at the first
// rejection the caches roll back and the policy's own choice is emitted. All accepted: the base's
// extra row gives one more token.
void Engine::speculate(int k) {
    Decoder& d = *seq_.decoder;
    const GenParams& p = d.params();
    std::vector<Token>* targets = seq_.target;
    size_t before[kRoles];
    for (int r = 0; r < kRoles; ++r) before[r] = targets[r].size();

    k = std::min(k, static_cast<int>(p.max_tokens - d.tokens()) - 1);
    for (int r = 0; r < kRoles; ++r)
        if (used(r))
            k = std::min({k, models_[r]->n_ctx_seq() - 1 - static_cast<int>(targets[r].size()),
                          models_[r]->n_batch() - 1});
    const bool by_guide = p.drafter == Drafter::Guide;
    std::vector<Token> drafts;
    if (k >= 1) drafts = by_guide ? draft_with_guide(k) : draft_from_context(k);
    if (drafts.empty()) return plain_step();
    k = static_cast<int>(drafts.size());
    std::vector<const float*> lb = verify(kBase, drafts, base_row0_);
    std::vector<const float*> la, lg_ngram;
    if (used(kAnti)) la = verify(kAnti, drafts, anti_row0_);
    // the guide's logits at drafted position j: kept while drafting, or read in one batch the
    // first time the gate consults it (n-gram drafts)
    auto guide_row = [&](int j) -> const float* {
        if (by_guide) return j < k ? guide_rows_[j].data() : logits(kGuide);
        if (lg_ngram.empty()) lg_ngram = verify(kGuide, drafts, guide_row0_);
        return lg_ngram[j];
    };
    drafted_ += k;

    int accepted = 0;
    bool finished = false;
    Step correction;  // the policy's own choice at the first rejected position
    bool rejected = false;
    for (int j = 0; j < k && !finished; ++j) {
        const bool consult = d.gate(lb[j]);
        Step s;
        const bool accept = d.verify(consult && used(kGuide) ? guide_row(j) : nullptr,
                                     consult && used(kAnti) ? la[j] : nullptr, drafts[j],
                                     by_guide && !d.sampler().greedy() ? draft_q_[j].data() : nullptr, s);
        accept_ema_ = 0.9 * accept_ema_ + (accept ? 0.1 : 0.0);  // per drafted position
        if (!accept) {
            correction = std::move(s);
            rejected = true;
            break;
        }
        ++accepted;
        finished = emit(s, true);
    }
    accepted_ += accepted;
    // every model now follows the accepted drafts, whether it read them in the batch (the rest
    // rolls back at its next read) or not (a lazy guide that was never consulted reads them later)
    for (int r = 0; r < kRoles; ++r)
        if (used(r)) {
            targets[r].resize(before[r]);
            targets[r].insert(targets[r].end(), drafts.begin(), drafts.begin() + accepted);
        }
    if (rejected) {
        emit(correction, false);
    } else if (!finished) {  // all accepted: the token after the last draft
        const bool consult = d.gate(lb[k]);
        d.decide(consult && used(kGuide) ? guide_row(k) : nullptr, consult && used(kAnti) ? la[k] : nullptr, 0.0f);
        emit(d.decided(), false);
    }
    // adapt (speculative on): a fully accepted draft may grow, a rejection shrinks to what was accepted
    draft_len_ = accepted == k ? std::min(2 * draft_len_, p.draft_max) : std::max(1, accepted + 1);
}

Stats decoder_stats(const Decoder& d) {
    Stats s;
    s.tokens = d.tokens();
    s.interventions = d.interventions();
    s.capped = d.capped();
    s.intervention_rate = s.tokens ? static_cast<double>(s.interventions) / s.tokens : 0;
    s.mean_alpha = d.mean_alpha();
    s.finish_reason = d.finish_reason();
    s.warning = d.warning();
    return s;
}

Stats Engine::stats() const {
    Lease::Read read(lease_, kEngineName);
    Stats s = seq_.decoder ? decoder_stats(*seq_.decoder) : Stats{};
    s.drafted = drafted_;
    s.accepted = accepted_;
    s.acceptance_rate = drafted_ ? static_cast<double>(accepted_) / drafted_ : 0;
    seq_.count(s, models_);
    auto end = active_ ? std::chrono::steady_clock::now() : t_end_;
    s.prefill_s = seconds(t_first_ - t_start_);
    s.generate_s = seconds(end - t_first_);
    s.tokens_per_s = s.generate_s > 0 ? s.tokens / s.generate_s : 0;
    return s;
}

}  // namespace blendin
