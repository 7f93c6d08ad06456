// RAII owner of one llama_model + llama_context: vocabulary, tokenizer, metadata, batched decode
// with per-row logits, LoRA adapters with run-time scales, and the record of what each sequence
// of the KV cache holds (so that every user of the model derives its prefix reuse from one
// truth). Knows nothing about blending.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lease.h"
#include "rpc.h"

struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_adapter_lora;
struct llama_batch;

namespace blendin {

using Token = int32_t;

struct ModelParams {
    int n_ctx = 0;          // 0: the model's training context
    int n_batch = 512;      // most tokens one decode call may take
    int n_seq_max = 1;      // parallel sequences (best-of-N)
    int n_gpu_layers = 0;   // -1: all
    int n_threads = 0;      // 0: all hardware threads
    // q8_0, f16 or f32 for the K and V caches; "" (the default): q8_0 where 32 divides the
    // model's head sizes, else f16. llama.cpp's CPU flash attention takes other paths for f16 and
    // f32 caches (one that splits a lone row's cells among the threads from 512 cells, a tiled one
    // from 64 rows), which part a sequence's bits alone and in a batch; for q8_0 it has one
    // (docs/design.md section 4.3). It also halves the memory.
    std::string kv_type;
    // Let llama.cpp place weights in its extra CPU buffer types (CPU_REPACK, AMX where offered):
    // faster, but their kernels take one accumulation order for one row and another for several,
    // so a row's result depends on the batch. The caller decides (Python's
    // `use_extra_buffer_types`: off for deterministic models, and where AMX would be among them).
    bool extra_buffers = false;
    // "host:port" of ggml RPC servers: the layers go to them (in proportion to their free memory)
    // instead of this process's CPU; n_gpu_layers then counts the layers sent to them (-1: all).
    std::vector<std::string> rpc;
};

// llama.cpp's CPU matmul for K-quants takes a tiled kernel when a batch has 8 or more rows, with
// another accumulation order than the one-row kernel: a row's logits would depend on how many
// other rows share its decode (docs/design.md section 4.3). ggml reads its switch
// (GGML_CPU_TILED_MM) once, at its first such matmul: this turns it off, unless the user set it,
// at import and again before a model loads.
void batch_invariant_kernels();

// The CPU backend's extra weight buffer types in this build on this CPU, in llama.cpp's order of
// preference (for example "AMX", "CPU_REPACK").
std::vector<std::string> cpu_extra_buffer_types();
// The GPU devices llama.cpp's backends offer in this build on this machine ("CUDA0: NVIDIA H200,
// 143771 MiB"), in llama.cpp's order; empty for a CPU build or a machine without a usable GPU. (Not
// llama_supports_gpu_offload, which also says yes for a CPU build that has the RPC backend.)
std::vector<std::string> gpu_devices();

// One row of a batch: the next token of a sequence (its position is the sequence's length, which
// the Model knows), with or without logits.
struct BatchItem {
    Token token;
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
    bool is_bpe() const;  // byte-level BPE with a pre-tokenizer (text splits into independent chunks)
    std::vector<Token> tokenize(const std::string& text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<Token>& tokens, bool remove_special = false,
                           bool unparse_special = false) const;
    std::string piece(Token t, bool special = false) const;  // raw bytes, possibly partial UTF-8
    // The token's bytes as generated text (no control-token text), from a table built once.
    std::string_view text_piece(Token t) const;
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
    int n_ctx() const { return n_ctx_; }  // KV cells, all sequences together
    int n_ctx_seq() const { return n_ctx_seq_; }  // the tokens one sequence can hold: n_ctx / n_seq_max
    int n_ctx_train() const;
    int n_batch() const { return n_batch_; }
    int n_seq_max() const { return n_seq_max_; }
    int n_embd() const;
    // The buffer types llama.cpp placed the weights in, with their sizes in MiB (as it logs them).
    const std::vector<std::pair<std::string, double>>& buffer_types() const { return buffer_types_; }
    // The KV cache's memory in MiB, all sequences together (as llama.cpp logs its buffers).
    double kv_mib() const { return kv_mib_; }
    const std::string& kv_type() const { return kv_type_; }  // "q8_0", "f16" or "f32"

    // ---- the KV cache: the Model alone records what each sequence holds ----
    // (valid while the caller holds the lease; from another thread, copy it under a Lease::Read)
    const std::vector<Token>& tokens(int seq) const;
    // The tokens all sequences hold together (a prefix one sequence shares with another counts twice).
    long kv_tokens() const;

    // Decode one batch (at most n_batch items), each item appended to its sequence. logits(i) is
    // the i-th row that asked for logits, until the next decode (truncate and copy_seq leave the
    // rows as they are: each is read by its position in the batch, as llama.cpp numbers it).
    void decode(const std::vector<BatchItem>& batch);
    // Decode any number of items: the sequences with one item together, each other sequence's
    // items on their own, in chunks of n_batch (so that a row never depends on the batch it came
    // in); on_row(i, row) is called for every item i that asks for logits, while its row is
    // valid. The last chunk's rows stay readable.
    void decode_all(const std::vector<BatchItem>& items,
                    const std::function<void(size_t, const float*)>& on_row = {});
    // Append tokens to a sequence, with logits for the last one only (or none).
    void extend(int seq, const Token* tokens, size_t n, bool logits_last = true);
    // Make a sequence hold exactly `target` (keeping the longest common prefix it already holds;
    // the last token is decoded again if its logits are gone) and return the logits after it.
    const float* sync(int seq, const std::vector<Token>& target);
    // The same for several sequences in one batched decode: on_row(i, row) gives request i's
    // logits, valid during the call only.
    struct SyncRequest {
        int seq;
        const std::vector<Token>* target;
    };
    void sync_all(const std::vector<SyncRequest>& requests, const std::function<void(size_t, const float*)>& on_row);
    const float* logits(int i) const;
    int n_logits() const { return static_cast<int>(rows_.size()); }
    // The logits after the first n tokens of seq, if the last decode produced them and the
    // sequence still holds exactly those n tokens; nullptr otherwise.
    const float* logits_after(int seq, size_t n) const;
    void truncate(int seq, int n_keep);      // drop positions >= n_keep of a sequence (all if seq < 0)
    void copy_seq(int src, int dst, int n);  // dst holds the first n tokens of src (shared cells)
    long long decode_calls() const { return decode_calls_.load(std::memory_order_relaxed); }
    long long decoded_tokens() const { return decoded_tokens_.load(std::memory_order_relaxed); }
    // Seconds a decode of k tokens with logits on every row takes on this device: measured the
    // first time it is asked (batches of 1, 2, 4 and 8 appended to sequence 0 and removed again,
    // the best of two rounds after a warm-up round), interpolated in between and extrapolated beyond.
    double decode_seconds(int k);

    // LoRA adapters (Alignment Vectors): scales can change between decodes with no reload. The
    // KV cache was computed with the old weights, so a change clears it.
    int n_adapters() const { return static_cast<int>(adapters_.size()); }
    std::vector<float> adapter_scales() const {
        Lease::Read read(lease_, name());
        return scales_;
    }
    void set_adapter_scales(const std::vector<float>& scales);

    // Held by whoever runs a sequence of calls that must not interleave with another thread's.
    // (mutable: a read of a const Model takes it too)
    Lease& lease() const { return lease_; }
    // How messages name the model: "the model 'PATH'" unless set (a server names its models by
    // their served name, not by a file on its disk).
    std::string name() const { return name_.empty() ? "the model '" + path_ + "'" : name_; }
    void set_name(const std::string& name) { name_ = name; }
    const std::vector<std::string>& rpc() const { return rpc_.endpoints(); }

private:
    void release();  // frees whatever llama.cpp objects exist: the destructor's and a failed constructor's cleanup
    void check_seq(int seq) const;
    // A llama.cpp call that may reach an RPC server: guarded against the server failing (rpc.h).
    void remote(const std::string& what, const std::function<void()>& fn);

    std::string path_, name_, kv_type_;
    llama_model* model_ = nullptr;
    llama_context* ctx_ = nullptr;
    const llama_vocab* vocab_ = nullptr;
    std::unique_ptr<llama_batch> batch_;  // one llama_batch of n_batch rows, reused by every decode
    std::vector<llama_adapter_lora*> adapters_;
    std::vector<float> scales_;
    std::vector<std::vector<Token>> seqs_;   // what each sequence of the KV cache holds
    struct Row {
        int seq;
        size_t after;  // the sequence's length when the row was computed (logits after that many tokens)
        int batch;     // the item's position in the batch: llama.cpp's own index of the row
        bool current;  // the sequence still holds those tokens (no truncate or copy_seq dropped them since)
    };
    std::vector<Row> rows_;  // per logits row of the last decode
    mutable std::string pieces_;              // text_piece table: all pieces, concatenated ...
    mutable std::vector<uint32_t> piece_end_; // ... and where each ends
    mutable std::once_flag pieces_once_;
    int n_vocab_ = 0, n_ctx_ = 0, n_ctx_seq_ = 0, n_batch_ = 0, n_seq_max_ = 1;
    long long file_size_ = 0;
    std::atomic<long long> decode_calls_{0}, decoded_tokens_{0};  // read by statistics without the lease
    std::vector<std::pair<int, double>> decode_seconds_;  // measured (k, seconds)
    std::vector<std::pair<std::string, double>> buffer_types_;
    double kv_mib_ = 0;
    rpc::Hold rpc_;  // the RPC servers this model's layers live on (none: all local)
    mutable Lease lease_;
};

// Route llama.cpp's log to stderr (true) or drop it (false, the default). Errors are always kept
// in a small buffer so that load failures can say why.
void set_verbose(bool on);

}  // namespace blendin
