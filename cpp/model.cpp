#include "model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>

#include "error.h"
#include "gguf_check.h"
#include "ggml-backend.h"
#include "llama.h"

namespace blendin {

// ---- logging: llama.cpp's log is process-wide; we keep it quiet unless asked ----
namespace {
std::mutex g_log_mutex;
bool g_verbose = false;
std::deque<std::string> g_errors;  // recent warnings/errors, to explain load failures
// The model this thread is loading: llama.cpp logs the buffer types it chose from the loading
// thread, and offers no other way to ask.
thread_local std::vector<std::pair<std::string, double>>* t_buffer_types = nullptr;
// ... and the KV cache it allocates for the context this thread creates (summed: a model with
// sliding-window layers has two caches, a split model one buffer per device)
thread_local double* t_kv_mib = nullptr;

void log_callback(ggml_log_level level, const char* text, void*) {
    if (t_buffer_types && level == GGML_LOG_LEVEL_INFO) {
        char name[64];
        double mib = 0;
        if (const char* at = std::strstr(text, ": "))
            if (std::sscanf(at + 2, "%63s model buffer size = %lf MiB", name, &mib) == 2)
                t_buffer_types->emplace_back(name, mib);
    }
    if (t_kv_mib && level == GGML_LOG_LEVEL_INFO) {
        char name[64];
        double mib = 0;
        if (const char* at = std::strstr(text, ": "))
            if (std::sscanf(at + 2, "%63s KV buffer size = %lf MiB", name, &mib) == 2) *t_kv_mib += mib;
    }
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (g_verbose) std::fputs(text, stderr);
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        std::string line(text);
        while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
        if (line.empty()) return;
        g_errors.push_back(line);
        if (g_errors.size() > 8) g_errors.pop_front();
    }
}

void install_logging() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

std::string take_errors() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string out;
    for (auto& e : g_errors) out += (out.empty() ? "" : "; ") + e;
    g_errors.clear();
    return out;
}

ggml_type kv_ggml_type(const std::string& name) {
    if (name.empty()) return GGML_TYPE_COUNT;  // chosen per model, once it is loaded
    if (name == "f16") return GGML_TYPE_F16;
    if (name == "f32") return GGML_TYPE_F32;
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    throw ValueError("kv_type must be 'f16', 'f32' or 'q8_0', not '" + name + "'");
}

template <class F>
std::string read_str(F&& f) {
    std::string buf(256, '\0');
    int n = f(buf.data(), buf.size());
    if (n < 0) return "";
    if (static_cast<size_t>(n) >= buf.size()) {
        buf.assign(n + 1, '\0');
        n = f(buf.data(), buf.size());
    }
    buf.resize(std::max(n, 0));
    return buf;
}
}  // namespace

void set_verbose(bool on) {
    install_logging();
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_verbose = on;
}

std::vector<std::string> cpu_extra_buffer_types() {
    install_logging();
    std::vector<std::string> out;
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) return out;
    auto get = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts"));
    for (ggml_backend_buffer_type_t* b = get ? get(cpu) : nullptr; b && *b; ++b) out.emplace_back(ggml_backend_buft_name(*b));
    return out;
}

std::vector<std::string> gpu_devices() {
    install_logging();
    std::vector<std::string> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto type = ggml_backend_dev_type(dev);
        if (type != GGML_BACKEND_DEVICE_TYPE_GPU && type != GGML_BACKEND_DEVICE_TYPE_IGPU) continue;
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(dev, &free, &total);
        out.push_back(std::string(ggml_backend_dev_name(dev)) + ": " + ggml_backend_dev_description(dev) + ", " +
                      std::to_string(total >> 20) + " MiB");
    }
    return out;
}

void batch_invariant_kernels() {
    static std::once_flag once;
    std::call_once(once, [] { setenv("GGML_CPU_TILED_MM", "0", 0); });
}

// ---- lifetime ----
Model::Model(const std::string& path, const ModelParams& p,
             const std::vector<std::pair<std::string, float>>& adapters)
    : path_(path) {
    if (p.n_ctx < 0) throw ValueError("n_ctx must be positive (or 0 for the model's own context), got " + std::to_string(p.n_ctx));
    if (p.n_batch <= 0) throw ValueError("n_batch must be positive, got " + std::to_string(p.n_batch));
    if (p.n_seq_max <= 0 || p.n_seq_max > 256) throw ValueError("n_seq_max must be in 1..256, got " + std::to_string(p.n_seq_max));
    if (p.n_threads < 0) throw ValueError("n_threads must be >= 0 (0 = all cores), got " + std::to_string(p.n_threads));
    ggml_type kv = kv_ggml_type(p.kv_type);  // checked before anything loads
    if (p.n_ctx > 0 && p.n_ctx < p.n_seq_max)
        throw ValueError("n_ctx = " + std::to_string(p.n_ctx) + " cannot give each of n_seq_max = " +
                         std::to_string(p.n_seq_max) + " sequences a token of context");
    file_size_ = check_gguf(path).file_size;  // before llama.cpp sees the file: it aborts on some
    install_logging();
    batch_invariant_kernels();
    take_errors();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = p.n_gpu_layers;
    mp.use_extra_bufts = p.extra_buffers;
    std::vector<ggml_backend_dev_t> devices;
    if (!p.rpc.empty()) {
        devices = rpc::devices(p.rpc);  // checked: reachable, same protocol
        devices.push_back(nullptr);
        mp.devices = devices.data();
        rpc_.take(p.rpc);
    }
    remote("loading '" + path + "'", [&] {
        t_buffer_types = &buffer_types_;
        model_ = llama_model_load_from_file(path.c_str(), mp);
        t_buffer_types = nullptr;
    });
    if (!model_) {
        std::string why = take_errors();
        throw ValueError("llama.cpp could not load '" + path + "'" + (why.empty() ? "" : ": " + why));
    }
    // from here on every failure frees what exists through release(), as the destructor does
    try {
        vocab_ = llama_model_get_vocab(model_);
        n_vocab_ = llama_vocab_n_tokens(vocab_);

        if (kv == GGML_TYPE_COUNT) {
            // q8_0 stores blocks of 32 values: it needs heads whose sizes 32 divides
            const std::string arch = meta("general.architecture");
            const int n_head = std::max(1, llama_model_n_head(model_));
            auto head = [&](const char* key) {
                const std::string v = meta(arch + ".attention." + key);
                return v.empty() ? llama_model_n_embd(model_) / n_head : std::atoi(v.c_str());
            };
            kv = head("key_length") % 32 == 0 && head("value_length") % 32 == 0 ? GGML_TYPE_Q8_0 : GGML_TYPE_F16;
        }
        kv_type_ = ggml_type_name(kv);
        llama_context_params cp = llama_context_default_params();
        n_ctx_ = p.n_ctx > 0 ? p.n_ctx : llama_model_n_ctx_train(model_);
        n_batch_ = std::min(p.n_batch, n_ctx_);
        n_seq_max_ = p.n_seq_max;
        n_ctx_seq_ = n_ctx_ / n_seq_max_;
        int threads = p.n_threads > 0 ? p.n_threads : std::max(1u, std::thread::hardware_concurrency());
        cp.n_ctx = n_ctx_;
        cp.n_batch = n_batch_;
        cp.n_ubatch = n_batch_;
        cp.n_seq_max = n_seq_max_;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.type_k = kv;
        cp.type_v = kv;
        // Each sequence in its own cells, attended to by flash attention one query row at a time:
        // a sequence's attention then reads only its own cells in the same order whatever else
        // the batch holds (a unified cache masks other sequences' cells, and their number changes
        // the reduction). Costs memory: a prompt shared by several sequences is stored in each.
        cp.kv_unified = false;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;  // quantized V needs it too
        cp.no_perf = true;
        remote("creating the context of '" + path + "'", [&] {
            t_kv_mib = &kv_mib_;
            ctx_ = llama_init_from_model(model_, cp);
            t_kv_mib = nullptr;
        });
        if (!ctx_) {
            std::string why = take_errors();
            throw ValueError("llama.cpp could not create a context of " + std::to_string(n_ctx_) + " tokens for '" +
                             path + "'" + (why.empty() ? "" : ": " + why));
        }
        // llama.cpp may round the context up (to a multiple of 256); we keep the size asked for
        BLENDIN_CHECK(static_cast<int>(llama_n_ctx(ctx_)) >= n_ctx_);
        batch_ = std::make_unique<llama_batch>();
        *batch_ = llama_batch_init(n_batch_, 0, 1);
        seqs_.resize(n_seq_max_);

        for (auto& [apath, scale] : adapters) {
            std::error_code ec;
            if (!std::filesystem::is_regular_file(apath, ec)) throw FileError("adapter file not found: '" + apath + "'");
            llama_adapter_lora* a = llama_adapter_lora_init(model_, apath.c_str());
            if (!a) {
                std::string why = take_errors();
                throw ValueError("llama.cpp could not load the adapter '" + apath + "' for '" + path + "'" +
                                 (why.empty() ? "" : ": " + why));
            }
            adapters_.push_back(a);
            scales_.push_back(scale);
        }
        if (!adapters_.empty() && llama_set_adapters_lora(ctx_, adapters_.data(), adapters_.size(), scales_.data()) != 0)
            throw Error("llama.cpp refused the adapter scales: " + take_errors());
    } catch (...) {
        release();
        throw;
    }
}

void Model::remote(const std::string& what, const std::function<void()>& fn) {
    if (rpc_.empty()) return fn();
    rpc::guarded(what, fn);
}

Model::~Model() { release(); }

void Model::release() {
    auto free_all = [this] {
        for (auto* a : adapters_) llama_adapter_lora_free(a);
        adapters_.clear();
        if (batch_) llama_batch_free(*batch_);
        batch_.reset();
        if (ctx_) llama_free(ctx_);
        ctx_ = nullptr;
        if (model_) llama_model_free(model_);
        model_ = nullptr;
    };
    if (rpc_.empty()) return free_all();
    // Freeing talks to the servers. After an RPC failure (earlier, or during this) it would wait
    // on ggml's parked connection thread: the model is left allocated instead.
    try {
        rpc::guarded("freeing '" + path_ + "'", free_all);
    } catch (const std::exception&) {
    }
}

// ---- vocabulary ----
Token Model::bos() const { return llama_vocab_bos(vocab_); }
Token Model::eos() const { return llama_vocab_eos(vocab_); }
Token Model::eot() const { return llama_vocab_eot(vocab_); }
bool Model::add_bos() const { return llama_vocab_get_add_bos(vocab_); }
bool Model::is_eog(Token t) const { return t >= 0 && t < n_vocab_ && llama_vocab_is_eog(vocab_, t); }
bool Model::is_control(Token t) const { return t >= 0 && t < n_vocab_ && llama_vocab_is_control(vocab_, t); }
bool Model::is_bpe() const { return llama_vocab_type(vocab_) == LLAMA_VOCAB_TYPE_BPE; }

long Model::kv_tokens() const {
    Lease::Read read(lease_, name());
    long n = 0;
    for (const auto& seq : seqs_) n += static_cast<long>(seq.size());
    return n;
}

void Model::check_tokens(const std::vector<Token>& tokens) const {
    for (Token t : tokens)
        if (t < 0 || t >= n_vocab_)
            throw ValueError("token " + std::to_string(t) + " is outside the vocabulary of " + name() + " (" +
                             std::to_string(n_vocab_) + " tokens)");
}

std::vector<Token> Model::tokenize(const std::string& text, bool add_special, bool parse_special) const {
    if (text.size() > static_cast<size_t>(INT32_MAX / 2)) throw ValueError("text too long to tokenize");
    std::vector<Token> out(text.size() + 2);
    int n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                           static_cast<int32_t>(out.size()), add_special, parse_special);
    if (n < 0) {
        out.resize(-n);
        n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                           static_cast<int32_t>(out.size()), add_special, parse_special);
    }
    if (n < 0) throw Error("tokenization failed for a text of " + std::to_string(text.size()) + " bytes");
    out.resize(n);
    return out;
}

std::string Model::detokenize(const std::vector<Token>& tokens, bool remove_special, bool unparse_special) const {
    check_tokens(tokens);
    std::string out(tokens.size() * 8 + 16, '\0');
    int n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                             static_cast<int32_t>(out.size()), remove_special, unparse_special);
    if (n < 0) {
        out.assign(-n, '\0');
        n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                             static_cast<int32_t>(out.size()), remove_special, unparse_special);
    }
    if (n < 0) throw Error("detokenization failed");
    out.resize(n);
    return out;
}

std::string Model::piece(Token t, bool special) const {
    check_tokens({t});
    char buf[128];
    int n = llama_token_to_piece(vocab_, t, buf, sizeof buf, 0, special);
    if (n >= 0) return std::string(buf, n);
    std::string big(-n, '\0');
    n = llama_token_to_piece(vocab_, t, big.data(), static_cast<int32_t>(big.size()), 0, special);
    big.resize(std::max(n, 0));
    return big;
}

std::string_view Model::text_piece(Token t) const {
    std::call_once(pieces_once_, [this] {
        piece_end_.resize(n_vocab_);
        for (Token i = 0; i < n_vocab_; ++i) {
            pieces_ += piece(i, false);
            piece_end_[i] = static_cast<uint32_t>(pieces_.size());
        }
    });
    if (t < 0 || t >= n_vocab_) check_tokens({t});
    const uint32_t begin = t == 0 ? 0 : piece_end_[t - 1];
    return std::string_view(pieces_).substr(begin, piece_end_[t] - begin);
}

// ---- metadata ----
std::string Model::meta(const std::string& key) const {
    return read_str([&](char* b, size_t n) { return llama_model_meta_val_str(model_, key.c_str(), b, n); });
}

std::map<std::string, std::string> Model::metadata() const {
    std::map<std::string, std::string> out;
    int n = llama_model_meta_count(model_);
    for (int i = 0; i < n; ++i) {
        auto k = read_str([&](char* b, size_t s) { return llama_model_meta_key_by_index(model_, i, b, s); });
        auto v = read_str([&](char* b, size_t s) { return llama_model_meta_val_str_by_index(model_, i, b, s); });
        out[k] = v;
    }
    return out;
}

std::string Model::chat_template() const {
    const char* t = llama_model_chat_template(model_, nullptr);
    return t ? t : "";
}

std::string Model::description() const {
    return read_str([&](char* b, size_t n) { return llama_model_desc(model_, b, n); });
}

uint64_t Model::n_params() const { return llama_model_n_params(model_); }
uint64_t Model::model_size() const { return llama_model_size(model_); }
int Model::n_ctx_train() const { return llama_model_n_ctx_train(model_); }
int Model::n_embd() const { return llama_model_n_embd(model_); }

// ---- the KV cache ----
void Model::check_seq(int seq) const {
    if (seq < 0 || seq >= n_seq_max_)
        throw ValueError("sequence " + std::to_string(seq) + " is outside 0.." + std::to_string(n_seq_max_ - 1) +
                         " (the model was loaded with n_seq_max = " + std::to_string(n_seq_max_) + ")");
}

const std::vector<Token>& Model::tokens(int seq) const {
    check_seq(seq);
    return seqs_[seq];
}

void Model::decode(const std::vector<BatchItem>& items) {
    Lease::Scope use(lease_, name());
    const int n = static_cast<int>(items.size());
    if (n == 0) return;
    if (n > n_batch_)
        throw ValueError("a batch of " + std::to_string(n) + " tokens exceeds n_batch = " + std::to_string(n_batch_));
    // check everything before anything changes
    std::vector<size_t> length(n_seq_max_);
    for (int s = 0; s < n_seq_max_; ++s) length[s] = seqs_[s].size();
    std::vector<size_t> next = length;
    for (const BatchItem& it : items) {
        if (it.token < 0 || it.token >= n_vocab_) check_tokens({it.token});  // throws, naming the vocabulary
        check_seq(it.seq);
        if (static_cast<int>(next[it.seq]) >= n_ctx_seq_)
            throw ValueError("cannot decode at position " + std::to_string(next[it.seq]) + ": a sequence of " + name() +
                             " holds " + std::to_string(n_ctx_seq_) + " tokens (n_ctx " + std::to_string(n_ctx_) +
                             " / n_seq_max " + std::to_string(n_seq_max_) + "; raise n_ctx)");
        ++next[it.seq];
    }
    llama_batch& b = *batch_;
    std::vector<Row> rows;
    next = length;
    for (int i = 0; i < n; ++i) {
        const BatchItem& it = items[i];
        b.token[i] = it.token;
        b.pos[i] = static_cast<llama_pos>(next[it.seq]++);
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = it.seq;
        b.logits[i] = it.logits;
        if (it.logits) rows.push_back({it.seq, next[it.seq], i, true});
    }
    b.n_tokens = n;
    rows_.clear();
    int rc = 0;
    // with RPC servers, wait for the results inside the guard: afterwards nothing is in flight
    remote("decoding with " + name(), [&] {
        rc = llama_decode(ctx_, b);
        if (!rpc_.empty()) llama_synchronize(ctx_);
    });
    ++decode_calls_;
    decoded_tokens_ += n;
    if (rc != 0) {
        // leave the cache as the record says it is: drop whatever part of the batch got in
        for (int s = 0; s < n_seq_max_; ++s)
            if (next[s] != length[s]) llama_memory_seq_rm(llama_get_memory(ctx_), s, static_cast<llama_pos>(length[s]), -1);
        std::string why = take_errors();
        if (rc == 1)
            throw Error("the KV cache of " + name() + " is full: each sequence has " + std::to_string(n_ctx_seq_) +
                        " cells (raise n_ctx)");
        throw Error("llama_decode failed with code " + std::to_string(rc) + (why.empty() ? "" : ": " + why));
    }
    for (const BatchItem& it : items) seqs_[it.seq].push_back(it.token);
    rows_ = std::move(rows);
}

void Model::decode_all(const std::vector<BatchItem>& items, const std::function<void(size_t, const float*)>& on_row) {
    Lease::Scope use(lease_, name());
    // Sequences with one item are decoded together, in the order of their ids (llama.cpp puts
    // consecutive sequences of a non-unified cache in one micro-batch); a sequence with several
    // items (a prompt, a catch-up, drafts to verify) is decoded on its own, in chunks of n_batch.
    // Mixed, llama.cpp would split them into micro-batches of equal rows per sequence, and a
    // sequence's rows would be computed in shapes that depend on the others.
    std::vector<size_t> count(n_seq_max_);
    for (const BatchItem& it : items) {
        check_seq(it.seq);
        ++count[it.seq];
    }
    std::vector<std::vector<size_t>> calls(1);  // indices into items: the single items' call first
    std::vector<size_t> run_of(n_seq_max_, SIZE_MAX);
    for (size_t i = 0; i < items.size(); ++i) {
        const int s = items[i].seq;
        if (count[s] == 1) {
            calls[0].push_back(i);
            continue;
        }
        if (run_of[s] == SIZE_MAX || calls[run_of[s]].size() == static_cast<size_t>(n_batch_)) {
            run_of[s] = calls.size();
            calls.emplace_back();
        }
        calls[run_of[s]].push_back(i);
    }
    std::stable_sort(calls[0].begin(), calls[0].end(), [&](size_t a, size_t b) { return items[a].seq < items[b].seq; });
    std::vector<BatchItem> chunk;
    for (const auto& call : calls) {
        for (size_t start = 0; start < call.size(); start += n_batch_) {
            const size_t end = std::min(call.size(), start + n_batch_);
            chunk.clear();
            for (size_t j = start; j < end; ++j) chunk.push_back(items[call[j]]);
            decode(chunk);
            if (!on_row) continue;
            int r = 0;
            for (size_t j = start; j < end; ++j)
                if (items[call[j]].logits) on_row(call[j], logits(r++));
        }
    }
}

void Model::extend(int seq, const Token* tokens, size_t n, bool logits_last) {
    std::vector<BatchItem> items(n);
    for (size_t i = 0; i < n; ++i) items[i] = {tokens[i], seq, logits_last && i + 1 == n};
    decode_all(items);
}

const float* Model::sync(int seq, const std::vector<Token>& target) {
    const float* out = nullptr;
    sync_all({{seq, &target}}, [&](size_t, const float* row) { out = row; });
    return out;  // the only row of the last decode (or of the one before): still valid
}

void Model::sync_all(const std::vector<SyncRequest>& requests, const std::function<void(size_t, const float*)>& on_row) {
    Lease::Scope use(lease_, name());
    std::vector<BatchItem> items;
    std::vector<size_t> owner;  // request of each item
    std::vector<char> seen(n_seq_max_);
    for (size_t i = 0; i < requests.size(); ++i) {
        const int seq = requests[i].seq;
        const std::vector<Token>& target = *requests[i].target;
        check_seq(seq);
        BLENDIN_CHECK(!target.empty() && !seen[seq]);
        seen[seq] = 1;
        const std::vector<Token>& have = seqs_[seq];
        size_t common = std::mismatch(have.begin(), have.end(), target.begin(), target.end()).first - have.begin();
        if (common == target.size()) {
            if (const float* row = logits_after(seq, common)) {
                on_row(i, row);  // before any decode replaces it
                continue;
            }
            --common;  // read the last token again for its logits
        }
        if (have.size() > common) truncate(seq, static_cast<int>(common));
        for (size_t j = common; j < target.size(); ++j) {
            items.push_back({target[j], seq, j + 1 == target.size()});
            owner.push_back(i);
        }
    }
    decode_all(items, [&](size_t item, const float* row) { on_row(owner[item], row); });
}

const float* Model::logits(int i) const {
    if (i < 0 || i >= n_logits())
        throw ValueError("logits row " + std::to_string(i) + " does not exist (the last decode produced " +
                         std::to_string(n_logits()) + " rows)");
    const float* row = llama_get_logits_ith(ctx_, rows_[i].batch);
    if (!row) throw Error("llama.cpp returned no logits for row " + std::to_string(i));
    return row;
}

const float* Model::logits_after(int seq, size_t n) const {
    check_seq(seq);
    if (seqs_[seq].size() != n) return nullptr;
    for (int i = n_logits() - 1; i >= 0; --i)
        if (rows_[i].current && rows_[i].seq == seq && rows_[i].after == n) return logits(i);
    return nullptr;
}

void Model::truncate(int seq, int n_keep) {
    Lease::Scope use(lease_, name());
    if (n_keep < 0) throw ValueError("cannot keep a negative number of tokens");
    if (seq >= 0) check_seq(seq);
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), seq, n_keep, -1))
        throw Error("could not truncate the KV cache of sequence " + std::to_string(seq));
    for (int s = 0; s < n_seq_max_; ++s)
        if ((seq < 0 || s == seq) && seqs_[s].size() > static_cast<size_t>(n_keep)) seqs_[s].resize(n_keep);
    // a row is the logits after tokens its sequence may no longer hold
    for (Row& r : rows_)
        if (r.after > seqs_[r.seq].size()) r.current = false;
}

void Model::copy_seq(int src, int dst, int n) {
    Lease::Scope use(lease_, name());
    check_seq(src);
    check_seq(dst);
    if (n < 0 || static_cast<size_t>(n) > seqs_[src].size())
        throw ValueError("sequence " + std::to_string(src) + " holds " + std::to_string(seqs_[src].size()) +
                         " tokens, cannot share " + std::to_string(n));
    if (src == dst) return truncate(dst, n);
    // Sequences live in separate cells: llama.cpp copies a whole sequence's cells (it copies no
    // part of one), and the copy is cut to n after.
    llama_memory_seq_rm(llama_get_memory(ctx_), dst, -1, -1);
    llama_memory_seq_cp(llama_get_memory(ctx_), src, dst, -1, -1);
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), dst, n, -1))
        throw Error("could not truncate the KV cache of sequence " + std::to_string(dst));
    seqs_[dst].assign(seqs_[src].begin(), seqs_[src].begin() + n);
    for (Row& r : rows_)
        if (r.seq == dst) r.current = false;
}

double Model::decode_seconds(int k) {
    Lease::Scope use(lease_, name());  // the measurements are state too
    auto& c = decode_seconds_;
    if (c.empty()) {
        const std::vector<Token> kept = seqs_[0];
        const int top = std::min({8, n_batch_, n_ctx_ - static_cast<int>(kept.size())});
        const Token t = kept.empty() ? std::max(0, bos()) : kept.back();
        for (int n = 1; n <= top; n *= 2) c.emplace_back(n, 1e30);
        for (int round = 0; round < 3; ++round)  // the first round warms up (graphs, caches): not counted
            for (auto& [n, best] : c) {
                const auto t0 = std::chrono::steady_clock::now();
                decode(std::vector<BatchItem>(n, BatchItem{t, 0, true}));
                const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                if (round > 0) best = std::min(best, s);
                truncate(0, static_cast<int>(kept.size()));
            }
        if (c.empty()) c.emplace_back(1, 1.0);  // no room to measure: batches save nothing
    }
    for (size_t i = 1; i < c.size(); ++i)
        if (k <= c[i].first)
            return c[i - 1].second + (c[i].second - c[i - 1].second) * (k - c[i - 1].first) / (c[i].first - c[i - 1].first);
    return c.back().second * k / c.back().first;
}

void Model::set_adapter_scales(const std::vector<float>& scales) {
    if (scales.size() != adapters_.size())
        throw ValueError("expected " + std::to_string(adapters_.size()) + " adapter scales, got " +
                         std::to_string(scales.size()));
    for (float s : scales)
        if (!std::isfinite(s)) throw ValueError("adapter scales must be finite numbers");
    Lease::Scope use(lease_, name());
    if (scales == scales_) return;  // nothing changes: keep the cache
    if (llama_set_adapters_lora(ctx_, adapters_.data(), adapters_.size(), const_cast<float*>(scales.data())) != 0)
        throw Error("llama.cpp refused the adapter scales: " + take_errors());
    scales_ = scales;
    truncate(-1, 0);  // the cache holds keys and values computed with the old weights
}

}  // namespace blendin
