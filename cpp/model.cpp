#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>

#include "error.h"
#include "gguf_check.h"
#include "llama.h"

namespace blendin {

// ---- logging: llama.cpp's log is process-wide; we keep it quiet unless asked ----
namespace {
std::mutex g_log_mutex;
bool g_verbose = false;
std::deque<std::string> g_errors;  // recent warnings/errors, to explain load failures

void log_callback(ggml_log_level level, const char* text, void*) {
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

std::string last_log_errors() { return take_errors(); }

// ---- lifetime ----
Model::Model(const std::string& path, const ModelParams& p,
             const std::vector<std::pair<std::string, float>>& adapters)
    : path_(path) {
    if (p.n_ctx < 0) throw ValueError("n_ctx must be positive (or 0 for the model's own context), got " + std::to_string(p.n_ctx));
    if (p.n_batch <= 0) throw ValueError("n_batch must be positive, got " + std::to_string(p.n_batch));
    if (p.n_seq_max <= 0 || p.n_seq_max > 256) throw ValueError("n_seq_max must be in 1..256, got " + std::to_string(p.n_seq_max));
    if (p.n_threads < 0) throw ValueError("n_threads must be >= 0 (0 = all cores), got " + std::to_string(p.n_threads));
    ggml_type kv = kv_ggml_type(p.kv_type);
    file_size_ = check_gguf(path).file_size;  // before llama.cpp sees the file: it aborts on some
    install_logging();
    take_errors();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = p.n_gpu_layers;
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) {
        std::string why = take_errors();
        throw ValueError("llama.cpp could not load '" + path + "'" + (why.empty() ? "" : ": " + why));
    }
    vocab_ = llama_model_get_vocab(model_);
    n_vocab_ = llama_vocab_n_tokens(vocab_);

    llama_context_params cp = llama_context_default_params();
    n_ctx_ = p.n_ctx > 0 ? p.n_ctx : llama_model_n_ctx_train(model_);
    n_batch_ = std::min(p.n_batch, n_ctx_);
    n_seq_max_ = p.n_seq_max;
    int threads = p.n_threads > 0 ? p.n_threads : std::max(1u, std::thread::hardware_concurrency());
    cp.n_ctx = n_ctx_;
    cp.n_batch = n_batch_;
    cp.n_ubatch = n_batch_;
    cp.n_seq_max = n_seq_max_;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.type_k = kv;
    cp.type_v = kv;
    cp.kv_unified = true;  // sequences share the cells, so a shared prompt is stored once
    cp.no_perf = true;
    if (kv == GGML_TYPE_Q8_0) cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;  // quantized V needs it
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_) {
        std::string why = take_errors();
        llama_model_free(model_);
        throw ValueError("llama.cpp could not create a context of " + std::to_string(n_ctx_) + " tokens for '" +
                         path + "'" + (why.empty() ? "" : ": " + why));
    }
    // llama.cpp may round the context up (to a multiple of 256); we keep the size asked for
    BLENDIN_CHECK(static_cast<int>(llama_n_ctx(ctx_)) >= n_ctx_);

    try {
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
        if (!adapters_.empty()) set_adapter_scales(scales_);
    } catch (...) {
        for (auto* a : adapters_) llama_adapter_lora_free(a);
        llama_free(ctx_);
        llama_model_free(model_);
        throw;
    }
}

Model::~Model() {
    for (auto* a : adapters_) llama_adapter_lora_free(a);
    if (ctx_) llama_free(ctx_);
    if (model_) llama_model_free(model_);
}

// ---- vocabulary ----
Token Model::bos() const { return llama_vocab_bos(vocab_); }
Token Model::eos() const { return llama_vocab_eos(vocab_); }
Token Model::eot() const { return llama_vocab_eot(vocab_); }
bool Model::add_bos() const { return llama_vocab_get_add_bos(vocab_); }
bool Model::is_eog(Token t) const { return t >= 0 && t < n_vocab_ && llama_vocab_is_eog(vocab_, t); }
bool Model::is_control(Token t) const { return t >= 0 && t < n_vocab_ && llama_vocab_is_control(vocab_, t); }

void Model::check_tokens(const std::vector<Token>& tokens) const {
    for (Token t : tokens)
        if (t < 0 || t >= n_vocab_)
            throw ValueError("token " + std::to_string(t) + " is outside the vocabulary of '" + path_ + "' (" +
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

// ---- decoding ----
void Model::decode(const std::vector<BatchItem>& items) {
    const int n = static_cast<int>(items.size());
    if (n == 0) return;
    if (n > n_batch_)
        throw ValueError("a batch of " + std::to_string(n) + " tokens exceeds n_batch = " + std::to_string(n_batch_));
    llama_batch b = llama_batch_init(n, 0, 1);
    n_out_ = 0;
    for (int i = 0; i < n; ++i) {
        const BatchItem& it = items[i];
        if (it.token < 0 || it.token >= n_vocab_) {
            llama_batch_free(b);
            check_tokens({it.token});
        }
        if (it.pos < 0 || it.pos >= n_ctx_) {
            llama_batch_free(b);
            throw ValueError("cannot decode at position " + std::to_string(it.pos) + ": the context of '" + path_ +
                             "' holds " + std::to_string(n_ctx_) + " tokens (raise n_ctx)");
        }
        if (it.seq < 0 || it.seq >= n_seq_max_) {
            llama_batch_free(b);
            throw ValueError("sequence " + std::to_string(it.seq) + " is outside 0.." + std::to_string(n_seq_max_ - 1));
        }
        b.token[i] = it.token;
        b.pos[i] = it.pos;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = it.seq;
        b.logits[i] = it.logits;
        n_out_ += it.logits;
    }
    b.n_tokens = n;
    int rc = llama_decode(ctx_, b);
    llama_batch_free(b);
    ++decode_calls_;
    decoded_tokens_ += n;
    if (rc != 0) {
        n_out_ = 0;
        std::string why = take_errors();
        if (rc == 1)
            throw Error("the KV cache of '" + path_ + "' is full (n_ctx = " + std::to_string(n_ctx_) + ")");
        throw Error("llama_decode failed with code " + std::to_string(rc) + (why.empty() ? "" : ": " + why));
    }
}

const float* Model::logits(int i) const {
    if (i < 0 || i >= n_out_)
        throw ValueError("logits row " + std::to_string(i) + " does not exist (the last decode produced " +
                         std::to_string(n_out_) + " rows)");
    const float* row = llama_get_logits_ith(ctx_, i - n_out_);  // negative: counted from the last output
    if (!row) throw Error("llama.cpp returned no logits for row " + std::to_string(i));
    return row;
}

void Model::decode_run(const Token* tokens, int n, int pos, int seq, bool logits_last) {
    std::vector<BatchItem> batch;
    for (int start = 0; start < n; start += n_batch_) {
        int end = std::min(n, start + n_batch_);
        batch.clear();
        for (int i = start; i < end; ++i) batch.push_back({tokens[i], pos + i, seq, logits_last && i == n - 1});
        decode(batch);
    }
}

void Model::truncate(int seq, int n_keep) {
    if (n_keep < 0) throw ValueError("cannot keep a negative number of tokens");
    if (!llama_memory_seq_rm(llama_get_memory(ctx_), seq, n_keep, -1))
        throw Error("could not truncate the KV cache of sequence " + std::to_string(seq));
}

void Model::copy_seq(int src, int dst, int n) {
    if (dst < 0 || dst >= n_seq_max_ || src < 0 || src >= n_seq_max_)
        throw ValueError("sequence ids must be in 0.." + std::to_string(n_seq_max_ - 1));
    llama_memory_seq_rm(llama_get_memory(ctx_), dst, -1, -1);
    llama_memory_seq_cp(llama_get_memory(ctx_), src, dst, 0, n);
}

void Model::set_adapter_scales(const std::vector<float>& scales) {
    if (scales.size() != adapters_.size())
        throw ValueError("expected " + std::to_string(adapters_.size()) + " adapter scales, got " +
                         std::to_string(scales.size()));
    for (float s : scales)
        if (!std::isfinite(s)) throw ValueError("adapter scales must be finite numbers");
    scales_ = scales;
    if (llama_set_adapters_lora(ctx_, adapters_.data(), adapters_.size(), scales_.data()) != 0)
        throw Error("llama.cpp refused the adapter scales: " + take_errors());
}

}  // namespace blendin
