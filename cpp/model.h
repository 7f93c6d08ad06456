// RAII owner of one llama_model + llama_context: vocabulary, tokenizer, metadata, batched decode
// with per-row logits, KV truncation per sequence, LoRA adapters with run-time scales.
// Knows nothing about blending.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_adapter_lora;

namespace blendin {

using Token = int32_t;

struct ModelParams {
    int n_ctx = 0;          // 0: the model's training context
    int n_batch = 512;      // most tokens one decode call may take
    int n_seq_max = 1;      // parallel sequences (best-of-N)
    int n_gpu_layers = 0;   // -1: all
    int n_threads = 0;      // 0: all hardware threads
    std::string kv_type = "f16";  // f16, f32 or q8_0 for the K and V caches
};

// One row of a batch: a token at a position of a sequence, with or without logits.
struct BatchItem {
    Token token;
    int pos;
    int seq = 0;
    bool logits = false;
};

class Model {
public:
    Model(const std::string& path, const ModelParams& params,
          const std::vector<std::pair<std::string, float>>& adapters = {});
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    // vocabulary and tokenizer
    int n_vocab() const { return n_vocab_; }
    Token bos() const;
    Token eos() const;
    Token eot() const;
    bool add_bos() const;
    bool is_eog(Token t) const;
    bool is_control(Token t) const;
    std::vector<Token> tokenize(const std::string& text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<Token>& tokens, bool remove_special = false,
                           bool unparse_special = false) const;
    std::string piece(Token t, bool special = false) const;  // raw bytes, possibly partial UTF-8
    void check_tokens(const std::vector<Token>& tokens) const;

    // metadata
    std::string path() const { return path_; }
    std::string meta(const std::string& key) const;  // "" when absent
    std::map<std::string, std::string> metadata() const;
    std::string architecture() const { return meta("general.architecture"); }
    std::string chat_template() const;
    std::string description() const;
    uint64_t n_params() const;
    uint64_t model_size() const;
    long long file_size() const { return file_size_; }
    int n_ctx() const { return n_ctx_; }
    int n_ctx_train() const;
    int n_batch() const { return n_batch_; }
    int n_seq_max() const { return n_seq_max_; }
    int n_embd() const;

    // decoding: logits(i) is the i-th row that asked for logits in the last decode
    void decode(const std::vector<BatchItem>& batch);
    const float* logits(int i) const;
    int n_logits() const { return n_out_; }
    // Decode a run of tokens of one sequence starting at `pos`, in chunks of n_batch, with
    // logits for the last token only (prefill, catch-up) or for none.
    void decode_run(const Token* tokens, int n, int pos, int seq = 0, bool logits_last = true);
    void truncate(int seq, int n_keep);  // drop positions >= n_keep of a sequence (all if seq < 0)
    void copy_seq(int src, int dst, int n);  // share positions [0, n) of src with dst
    long long decode_calls() const { return decode_calls_; }
    long long decoded_tokens() const { return decoded_tokens_; }

    // LoRA adapters (Alignment Vectors): scales can change between decodes with no reload
    int n_adapters() const { return static_cast<int>(adapters_.size()); }
    std::vector<float> adapter_scales() const { return scales_; }
    void set_adapter_scales(const std::vector<float>& scales);

private:
    std::string path_;
    llama_model* model_ = nullptr;
    llama_context* ctx_ = nullptr;
    const llama_vocab* vocab_ = nullptr;
    std::vector<llama_adapter_lora*> adapters_;
    std::vector<float> scales_;
    int n_vocab_ = 0, n_ctx_ = 0, n_batch_ = 0, n_seq_max_ = 1, n_out_ = 0;
    long long file_size_ = 0, decode_calls_ = 0, decoded_tokens_ = 0;
};

// Route llama.cpp's log to stderr (true) or drop it (false, the default). Errors are always kept
// in a small buffer so that load failures can say why.
void set_verbose(bool on);
std::string last_log_errors();

}  // namespace blendin
