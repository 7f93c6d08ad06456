// The nanobind module: the only file that knows Python. Converts types and exceptions; every
// call that decodes releases the GIL. What Python reads of a Model's or an Engine's state is a
// copy taken under its lease (Lease::Read): another thread's call on it meanwhile makes the read
// raise the busy error, never return half-changed state.
// Layout: one bind_X(m) per bound class (or family of functions), each a list of one-line
// bindings with the docstrings Python's help() shows; a call that needs more than a line
// (GIL release around a copy, a conversion) is a small free function just above its bind_X.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstring>
#include <optional>

#include "batch.h"
#include "engine.h"
#include "error.h"
#include "gguf_check.h"
#include "model.h"
#include "rpc.h"
#include "retokenizer.h"
#include "sampler.h"
#include "scheduler.h"

namespace nb = nanobind;
using namespace nb::literals;
using blendin::Engine;
using blendin::GenParams;
using blendin::Model;
using blendin::Token;

namespace {

nb::bytes to_bytes(const std::string& s) { return nb::bytes(s.data(), s.size()); }

// Generated text as str: models can write invalid UTF-8, which becomes U+FFFD.
nb::str to_text(const std::string& s) {
    return nb::steal<nb::str>(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace"));
}

// A diagnostic that was not computed is NaN in C++ and None in Python.
std::optional<float> maybe(float x) { return std::isnan(x) ? std::nullopt : std::optional<float>(x); }

// Logits rows as a fresh float32 numpy array of shape (rows, n_vocab) that owns its memory.
nb::ndarray<nb::numpy, float, nb::ndim<2>> to_array(std::vector<float>&& v, size_t rows, size_t cols) {
    auto* data = new std::vector<float>(std::move(v));
    nb::capsule owner(data, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    return nb::ndarray<nb::numpy, float, nb::ndim<2>>(data->data(), {rows, cols}, owner);
}

// Logits of every position of `tokens` in sequence 0, decoded from an empty sequence (a helper
// for tests and research; the engine never copies logits like this).
std::vector<float> all_logits(Model& m, const std::vector<Token>& tokens) {
    blendin::Lease::Scope use(m.lease(), m.name());  // the truncate and the decodes, as one call
    m.check_tokens(tokens);
    if (tokens.empty()) throw blendin::ValueError("logits() needs at least one token");
    if (static_cast<int>(tokens.size()) > m.n_ctx_seq())
        throw blendin::ValueError(std::to_string(tokens.size()) + " tokens do not fit the context of " +
                                  std::to_string(m.n_ctx_seq()));
    const size_t nv = m.n_vocab();
    std::vector<float> out(tokens.size() * nv);
    std::vector<blendin::BatchItem> items;
    for (Token t : tokens) items.push_back({t, 0, true});
    m.truncate(0, 0);
    m.decode_all(items, [&](size_t i, const float* row) { std::memcpy(&out[i * nv], row, nv * sizeof(float)); });
    return out;
}

// Model.decode from Python: positions are checked against what each sequence holds.
void decode_at(Model& m, const std::vector<Token>& tokens, const std::vector<int>& pos, const std::vector<int>& seq,
               const std::vector<bool>& want_logits) {
    const size_t n = tokens.size();
    if (pos.size() != n || seq.size() != n || want_logits.size() != n)
        throw blendin::ValueError("tokens, positions, sequences and logits flags must have the same length");
    std::vector<blendin::BatchItem> batch(n);
    nb::gil_scoped_release release;
    blendin::Lease::Scope use(m.lease(), m.name());  // the checks read what the decode extends
    std::vector<size_t> next(m.n_seq_max());
    for (int s = 0; s < m.n_seq_max(); ++s) next[s] = m.tokens(s).size();
    for (size_t i = 0; i < n; ++i) {
        if (seq[i] < 0 || seq[i] >= m.n_seq_max()) m.tokens(seq[i]);  // throws, naming the range
        if (pos[i] != static_cast<int>(next[seq[i]]))
            throw blendin::ValueError("token " + std::to_string(i) + " is at position " + std::to_string(pos[i]) +
                                      ", but sequence " + std::to_string(seq[i]) + " holds " +
                                      std::to_string(next[seq[i]]) +
                                      " tokens: a sequence grows one position at a time (truncate first)");
        ++next[seq[i]];
        batch[i] = {tokens[i], seq[i], static_cast<bool>(want_logits[i])};
    }
    m.decode(batch);
}

const char* speculative_name(blendin::Speculative s) {
    return s == blendin::Speculative::On ? "on" : s == blendin::Speculative::Auto ? "auto" : "off";
}

blendin::Speculative speculative_from(const std::string& s) {
    if (s == "off") return blendin::Speculative::Off;
    if (s == "on") return blendin::Speculative::On;
    if (s == "auto") return blendin::Speculative::Auto;
    throw blendin::ValueError("speculative must be 'off', 'on' or 'auto', not '" + s + "'");
}

blendin::Drafter drafter_from(const std::string& s) {
    if (s == "guide") return blendin::Drafter::Guide;
    if (s == "ngram") return blendin::Drafter::NGram;
    throw blendin::ValueError("drafter must be 'guide' or 'ngram', not '" + s + "'");
}

template <class T>
nb::dict by_role(const T (&per_role)[blendin::kRoles]) {
    nb::dict d;
    for (int r = 0; r < blendin::kRoles; ++r) d[blendin::role_name(r)] = per_role[r];
    return d;
}

nb::dict stats_dict(const blendin::Stats& s) {
    nb::dict d;
    d["tokens"] = s.tokens;
    d["interventions"] = s.interventions;
    d["capped"] = s.capped;
    d["drafted"] = s.drafted;
    d["accepted"] = s.accepted;
    d["acceptance_rate"] = s.acceptance_rate;
    d["intervention_rate"] = s.intervention_rate;
    d["mean_alpha"] = s.mean_alpha;
    d["prompt_tokens"] = by_role(s.prompt_tokens);
    d["reused_tokens"] = by_role(s.reused_tokens);
    d["decode_calls"] = by_role(s.decode_calls);
    d["decoded_tokens"] = by_role(s.decoded_tokens);
    d["prefill_s"] = s.prefill_s;
    d["generate_s"] = s.generate_s;
    d["tokens_per_s"] = s.tokens_per_s;
    d["finish_reason"] = s.finish_reason;
    d["warning"] = s.warning;
    return d;
}


nb::tuple check_gguf_summary(const std::string& path) {
    auto s = blendin::check_gguf(path);
    return nb::make_tuple(s.architecture, s.n_tensors, s.file_size);
}

nb::tuple method_roles(const std::string& name) {
    const blendin::Method m = blendin::method_from_name(name);
    return nb::make_tuple(blendin::uses_base(m), blendin::uses_guide(m), blendin::uses_anti(m));
}

nb::dict param_range_table() {
    nb::dict d;
    for (const auto& r : blendin::param_ranges())
        d[r.name.c_str()] = nb::make_tuple(r.lo, r.hi, r.lo_open, r.hi_open, r.integer, r.text());
    return d;
}

// GenParams.seed: any Python int in [0, 2^64), with the range's own message otherwise.
void set_seed(GenParams& p, nb::int_ v) {
    const unsigned long long seed = PyLong_AsUnsignedLongLong(v.ptr());
    if (PyErr_Occurred()) {  // negative or too big
        PyErr_Clear();
        throw blendin::ValueError("seed must be an integer " + blendin::param_range("seed").text() + " and below 2^64");
    }
    p.sampling.seed = seed;
}

// ---- module-level functions and the exceptions

// BlendError, the project's exception type (made by bind_functions, raised by scheduler_step too)
nb::handle blend_error_type;

void bind_functions(nb::module_& m) {
    static nb::exception<blendin::Error> blend_error(m, "BlendError", PyExc_RuntimeError);
    blend_error_type = blend_error;
    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const blendin::FileError& e) {
            PyErr_SetString(PyExc_FileNotFoundError, e.what());
        } catch (const blendin::ValueError& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    m.def("set_verbose", &blendin::set_verbose, "on"_a, "Print llama.cpp's log to stderr (off by default).");
    m.def("check_gguf", &check_gguf_summary, "path"_a, nb::call_guard<nb::gil_scoped_release>(),
          "Validate a GGUF file's header before llama.cpp sees it: (architecture, tensors, bytes).");
    m.def("cpu_extra_buffer_types", &blendin::cpu_extra_buffer_types,
          "The CPU backend's extra weight buffer types in this build on this CPU (e.g. AMX, CPU_REPACK).");
    m.def("gpu_devices", &blendin::gpu_devices,
          "The GPUs this llama.cpp build can use here ('CUDA0: NVIDIA H200, 143771 MiB'); empty without one.");
    m.def("rpc_available", &blendin::rpc::available, "Whether this llama.cpp build has the RPC backend.");
    m.def("rpc_failure", &blendin::rpc::failure, "The first RPC failure of this process ('' if none).");
    m.def("rpc_serve", &blendin::rpc::serve, "endpoint"_a, "cache_dir"_a, "n_threads"_a,
          nb::call_guard<nb::gil_scoped_release>(), "Run ggml's RPC server on this CPU (returns only on failure).");
    m.def("methods", &blendin::method_names, "The method names, in the core's order.");
    m.def("uses_roles", &method_roles, "method"_a, "(base, guide, anti): the models the method reads.");
    m.def("param_ranges", &param_range_table,
          "name -> (lo, hi, lo_open, hi_open, integer, text): the valid range of each numeric parameter.");
    m.def("check_param", &blendin::check_param, "name"_a, "value"_a,
          "Raise ValueError naming the parameter when the value (as given) is outside its range.");
}

// ---- Model: one llama_model + llama_context

void model_init(Model* self, const std::string& path, int n_ctx, int n_batch, int n_seq_max, int n_gpu_layers,
                int n_threads, const std::string& kv_type, const std::vector<std::pair<std::string, float>>& adapters,
                bool extra_buffers, const std::vector<std::string>& rpc) {
    blendin::ModelParams p{n_ctx, n_batch, n_seq_max, n_gpu_layers, n_threads, kv_type, extra_buffers, rpc};
    nb::gil_scoped_release release;
    new (self) Model(path, p, adapters);
}

nb::bytes model_detokenize(const Model& self, const std::vector<Token>& tokens, bool remove_special,
                           bool unparse_special) {
    std::string text;
    {
        nb::gil_scoped_release release;
        text = self.detokenize(tokens, remove_special, unparse_special);
    }
    return to_bytes(text);
}

nb::bytes model_piece(const Model& self, Token t, bool special) { return to_bytes(self.piece(t, special)); }

std::vector<Token> model_tokens(const Model& self, int seq) {
    blendin::Lease::Read read(self.lease(), self.name());
    return self.tokens(seq);  // a copy
}

nb::ndarray<nb::numpy, float, nb::ndim<2>> model_logits_row(const Model& self, int i) {
    std::vector<float> copy;
    {
        blendin::Lease::Read read(self.lease(), self.name());
        const float* row = self.logits(i);
        copy.assign(row, row + self.n_vocab());
    }
    return to_array(std::move(copy), 1, self.n_vocab());
}

nb::ndarray<nb::numpy, float, nb::ndim<2>> model_logits(Model& self, const std::vector<Token>& tokens) {
    std::vector<float> v;
    {
        nb::gil_scoped_release release;
        v = all_logits(self, tokens);
    }
    return to_array(std::move(v), tokens.size(), self.n_vocab());
}

void bind_model(nb::module_& m) {
    nb::class_<Model>(m, "Model", "One GGUF model and its llama.cpp context (blendin_cpp.Model wraps it).")
        .def("__init__", &model_init, "path"_a, "n_ctx"_a, "n_batch"_a, "n_seq_max"_a, "n_gpu_layers"_a,
             "n_threads"_a, "kv_type"_a, "adapters"_a, "extra_buffers"_a, "rpc"_a)
        .def_prop_ro("n_vocab", &Model::n_vocab, "Tokens in the vocabulary.")
        .def_prop_ro("n_ctx", &Model::n_ctx, "KV cells of the context (all sequences together).")
        .def_prop_ro("kv_type", &Model::kv_type, "The KV cache's type: q8_0, f16 or f32.")
        .def_prop_ro("n_ctx_seq", &Model::n_ctx_seq, "The tokens one sequence can hold (n_ctx / n_seq_max).")
        .def_prop_ro("n_ctx_train", &Model::n_ctx_train, "The context length the model was trained with.")
        .def_prop_ro("n_batch", &Model::n_batch, "Most tokens one decode takes.")
        .def_prop_ro("n_seq_max", &Model::n_seq_max, "Sequences the context holds at once.")
        .def_prop_ro("n_embd", &Model::n_embd, "Embedding width.")
        .def_prop_ro("bos", &Model::bos, "The start token (-1 if none).")
        .def_prop_ro("eos", &Model::eos, "The end-of-sequence token (-1 if none).")
        .def_prop_ro("eot", &Model::eot, "The end-of-turn token (-1 if none).")
        .def_prop_ro("add_bos", &Model::add_bos, "Whether tokenizing with add_special puts the start token first.")
        .def_prop_ro("path", &Model::path, "The GGUF file.")
        .def_prop_rw("name", &Model::name, &Model::set_name, "How messages name the model (the server: by its served name).")
        .def_prop_ro("kv_tokens", &Model::kv_tokens, "KV cells in use, over every sequence.")
        .def_prop_ro("architecture", &Model::architecture, "general.architecture (llama, qwen2, gemma3, ...).")
        .def_prop_ro("chat_template", &Model::chat_template, "tokenizer.chat_template ('' if none).")
        .def_prop_ro("description", &Model::description, "llama.cpp's one-line description of the model.")
        .def_prop_ro("n_params", &Model::n_params, "Parameters.")
        .def_prop_ro("model_size", &Model::model_size, "Bytes of the weights.")
        .def_prop_ro("file_size", &Model::file_size, "Bytes of the file.")
        .def_prop_ro("n_adapters", &Model::n_adapters, "LoRA adapters loaded with the model.")
        .def_prop_ro("decode_calls", &Model::decode_calls, "llama_decode calls so far.")
        .def_prop_ro("decoded_tokens", &Model::decoded_tokens, "Tokens decoded so far.")
        .def_prop_ro("rpc", &Model::rpc, "The RPC servers holding layers (HOST:PORT), empty when local.")
        .def_prop_ro("buffer_types", &Model::buffer_types, "(name, MiB) of each buffer llama.cpp put weights in.")
        .def_prop_ro("kv_mib", &Model::kv_mib, "The KV cache's memory in MiB (all sequences).")
        .def("is_eog", &Model::is_eog, "token"_a, "Whether llama.cpp calls the token end-of-generation.")
        .def("is_control", &Model::is_control, "token"_a, "Whether the token is a control token.")
        // tokenizing reads only the vocabulary; a long text takes long (llama.cpp's special-token
        // parsing is quadratic in the markers it finds): other threads run meanwhile
        .def("tokenize", &Model::tokenize, "text"_a, "add_special"_a, "parse_special"_a,
             nb::call_guard<nb::gil_scoped_release>(),
             "Token ids of text; parse_special reads control-token text as control tokens.")
        .def("detokenize", &model_detokenize, "tokens"_a, "remove_special"_a, "unparse_special"_a,
             "The bytes of a token list.")
        .def("piece", &model_piece, "token"_a, "special"_a, "The bytes of one token.")
        .def("meta", &Model::meta, "key"_a, "One GGUF metadata value as text ('' if absent).")
        .def("metadata", &Model::metadata, "Every GGUF metadata value as text.")
        .def("tokens", &model_tokens, "seq"_a, "What a sequence of the KV cache holds.")
        .def("decode", &decode_at, "tokens"_a, "positions"_a, "sequences"_a, "logits"_a,
             "Decode one batch: each token at its position in its sequence, with logits where asked.")
        .def("logits_row", &model_logits_row, "i"_a, "The logits of row i of the last decode, shape (1, n_vocab).")
        .def("logits", &model_logits, "tokens"_a,
             "The logits at every position of tokens read from an empty sequence 0, shape (len, n_vocab).")
        .def("truncate", &Model::truncate, "seq"_a, "n_keep"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Keep the first n_keep tokens of a sequence.")
        .def("copy_seq", &Model::copy_seq, "src"_a, "dst"_a, "n"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Make sequence dst hold the first n tokens of sequence src (shared KV cells).")
        .def("decode_seconds", &Model::decode_seconds, "k"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Seconds a decode of k tokens with logits on every row takes (measured once, then interpolated).")
        .def("adapter_scales", &Model::adapter_scales, "The LoRA adapters' scales.")
        .def("set_adapter_scales", &Model::set_adapter_scales, "scales"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Set the LoRA adapters' scales (no reload; empties the KV cache).");
}

// ---- GenParams: the parameters of one generation

void bind_gen_params(nb::module_& m) {
    nb::class_<GenParams>(m, "GenParams", "The parameters of one generation (validated by validate(), and by start).")
        .def(nb::init<>())
        .def_prop_rw("method", [](const GenParams& p) { return std::string(blendin::method_name(p.policy.method)); },
                     [](GenParams& p, const std::string& s) { p.policy.method = blendin::method_from_name(s); })
        .def_prop_rw("gamma", [](const GenParams& p) { return p.policy.gamma; }, [](GenParams& p, float v) { p.policy.gamma = v; })
        .def_prop_rw("alpha", [](const GenParams& p) { return p.policy.alpha; }, [](GenParams& p, float v) { p.policy.alpha = v; },
                     "in [0, 1]; negative: auto")
        .def_prop_rw("beta", [](const GenParams& p) { return p.policy.beta; }, [](GenParams& p, float v) { p.policy.beta = v; })
        .def_prop_rw("lambda_", [](const GenParams& p) { return p.policy.lambda; }, [](GenParams& p, float v) { p.policy.lambda = v; })
        .def_prop_rw("max_intervention_rate", [](const GenParams& p) { return p.policy.max_intervention_rate; },
                     [](GenParams& p, float v) { p.policy.max_intervention_rate = v; })
        .def_prop_rw("guide_ends", [](const GenParams& p) { return p.policy.guide_ends; },
                     [](GenParams& p, bool v) { p.policy.guide_ends = v; })
        .def_prop_rw("diagnostics", [](const GenParams& p) { return p.policy.diagnostics; },
                     [](GenParams& p, bool v) { p.policy.diagnostics = v; })
        .def_prop_rw("temperature", [](const GenParams& p) { return p.sampling.temperature; },
                     [](GenParams& p, float v) { p.sampling.temperature = v; })
        .def_prop_rw("top_k", [](const GenParams& p) { return p.sampling.top_k; }, [](GenParams& p, int v) { p.sampling.top_k = v; })
        .def_prop_rw("top_p", [](const GenParams& p) { return p.sampling.top_p; }, [](GenParams& p, float v) { p.sampling.top_p = v; })
        .def_prop_rw("min_p", [](const GenParams& p) { return p.sampling.min_p; }, [](GenParams& p, float v) { p.sampling.min_p = v; })
        .def_prop_rw("seed", [](const GenParams& p) { return p.sampling.seed; }, &set_seed)
        .def_rw("max_tokens", &GenParams::max_tokens)
        .def_rw("stop", &GenParams::stop)
        .def_rw("lazy", &GenParams::lazy)
        .def_prop_rw("speculative", [](const GenParams& p) { return std::string(speculative_name(p.speculative)); },
                     [](GenParams& p, const std::string& s) { p.speculative = speculative_from(s); })
        .def_prop_rw("drafter", [](const GenParams& p) { return std::string(p.drafter == blendin::Drafter::NGram ? "ngram" : "guide"); },
                     [](GenParams& p, const std::string& s) { p.drafter = drafter_from(s); })
        .def_rw("draft_max", &GenParams::draft_max)
        .def_rw("warn_intervention_rate", &GenParams::warn_intervention_rate)
        .def_rw("top_logprobs", &GenParams::top_logprobs)
        .def_rw("ignore_eos", &GenParams::ignore_eos)
        // the repetition controls (penalties.h)
        .def_prop_rw("presence_penalty", [](const GenParams& p) { return p.repeat.presence_penalty; },
                     [](GenParams& p, float v) { p.repeat.presence_penalty = v; })
        .def_prop_rw("frequency_penalty", [](const GenParams& p) { return p.repeat.frequency_penalty; },
                     [](GenParams& p, float v) { p.repeat.frequency_penalty = v; })
        .def_prop_rw("repeat_penalty", [](const GenParams& p) { return p.repeat.repeat_penalty; },
                     [](GenParams& p, float v) { p.repeat.repeat_penalty = v; })
        .def_prop_rw("repeat_last_n", [](const GenParams& p) { return p.repeat.repeat_last_n; },
                     [](GenParams& p, int v) { p.repeat.repeat_last_n = v; })
        .def_prop_rw("dry_multiplier", [](const GenParams& p) { return p.repeat.dry_multiplier; },
                     [](GenParams& p, float v) { p.repeat.dry_multiplier = v; })
        .def_prop_rw("dry_base", [](const GenParams& p) { return p.repeat.dry_base; },
                     [](GenParams& p, float v) { p.repeat.dry_base = v; })
        .def_prop_rw("dry_allowed_length", [](const GenParams& p) { return p.repeat.dry_allowed_length; },
                     [](GenParams& p, int v) { p.repeat.dry_allowed_length = v; })
        .def_prop_rw("dry_sequence_breakers", [](const GenParams& p) { return p.repeat.dry_sequence_breakers; },
                     [](GenParams& p, std::vector<std::string> v) { p.repeat.dry_sequence_breakers = std::move(v); })
        .def_prop_rw("loop_gate", [](const GenParams& p) { return p.repeat.loop_gate; },
                     [](GenParams& p, int v) { p.repeat.loop_gate = v; })
        .def("validate", [](const GenParams& p) { blendin::validate(p); },
             "Raise ValueError naming the first parameter out of its range.");
}

// ---- Step and Stats: what a generation reports

// Step's fields by name, for as_dict and __repr__ (through the bound properties, so the dict holds
// exactly what Python reads).
nb::dict step_dict(nb::handle self) {
    nb::dict d;
    for (const char* name : {"token", "text", "source", "pb_max", "pg_max", "alpha", "agree", "overlap", "intervened",
                             "capped", "looped", "finish_reason", "logprob", "top_logprobs", "guide_rank", "mass_above", "unmatched"})
        d[name] = self.attr(name);
    return d;
}

nb::str step_repr(nb::handle self) {
    return nb::str("Step(token={}, text={!r}, source={!r})")
        .format(self.attr("token"), self.attr("text"), self.attr("source"));
}

std::optional<int> step_guide_rank(const blendin::Step& s) {
    return s.info.guide_rank ? std::optional<int>(s.info.guide_rank) : std::nullopt;
}

std::optional<std::string> step_finish_reason(const blendin::Step& s) {
    return s.finish_reason.empty() ? std::nullopt : std::optional<std::string>(s.finish_reason);
}

void bind_step(nb::module_& m) {
    using blendin::Step;
    nb::class_<Step>(m, "Step",
                     "One generated token and why it was chosen. `source` is \"base\" (the base alone), "
                     "\"blend\" (a mixture) or \"guide\" (the guide alone); numbers are None where not computed.")
        .def_prop_ro("token", [](const Step& s) { return s.token; }, "The token id (base vocabulary).")
        .def_prop_ro("text", [](const Step& s) { return to_text(s.text); }, "the text this step releases")
        .def_prop_ro("text_bytes", [](const Step& s) { return to_bytes(s.text); },
                     "the same as bytes (a model may write invalid UTF-8, which `text` shows as U+FFFD)")
        .def_prop_ro("source", [](const Step& s) { return blendin::source_name(s.info.source); },
                     "\"base\", \"blend\" or \"guide\": whose distribution the token was drawn from")
        .def_prop_ro("intervened", [](const Step& s) { return s.info.intervened; },
                     "whether the guide was consulted at this token")
        .def_prop_ro("capped", [](const Step& s) { return s.info.capped; },
                     "the gate said intervene, max_intervention_rate said no")
        .def_prop_ro("looped", [](const Step& s) { return s.info.looped; },
                     "the loop-aware gate consulted the guide (the base's top token would repeat an n-gram)")
        .def_prop_ro("pb_max", [](const Step& s) { return maybe(s.info.pb_max); }, "the base's top probability")
        .def_prop_ro("pg_max", [](const Step& s) { return maybe(s.info.pg_max); }, "the guide's top probability")
        .def_prop_ro("alpha", [](const Step& s) { return maybe(s.info.alpha); }, "the guide's weight in the mixture")
        .def_prop_ro("agree", [](const Step& s) { return maybe(s.info.agree); },
                     "the base's probability of the guide's top token")
        .def_prop_ro("overlap", [](const Step& s) { return maybe(s.info.overlap); },
                     "diagnostics: top-10 overlap of the two distributions")
        .def_prop_ro("guide_rank", &step_guide_rank,
                     "diagnostics: rank (1 = top) of the guide's top token in the base distribution")
        .def_prop_ro("mass_above", [](const Step& s) { return maybe(s.info.mass_above); },
                     "diagnostics: the base's mass above the guide's top token")
        .def_prop_ro("unmatched", [](const Step& s) { return maybe(s.info.unmatched); },
                     "the share of guide mass with no exact base token (a guide with its own vocabulary)")
        .def_prop_ro("logprob", [](const Step& s) { return s.logprob; },
                     "log p(token) under the final distribution (temperature 1)")
        .def_prop_ro("top_logprobs", [](const Step& s) { return s.top_logprobs; },
                     "with top_logprobs=N: the N likeliest (token, logprob), best first")
        .def_prop_ro("finish_reason", &step_finish_reason,
                     "on the last step: \"stop\", \"length\" or \"context\"; None before")
        .def("as_dict", &step_dict, "The fields as a dict (for JSON).")
        .def("__repr__", &step_repr);
}

void bind_stats(nb::module_& m) {
    using blendin::Stats;
    nb::class_<Stats>(m, "Stats", "The statistics of one generation (as_dict(): the JSON form).")
        .def_ro("tokens", &Stats::tokens, "Tokens generated (the end token included).")
        .def_ro("interventions", &Stats::interventions, "Tokens at which the guide was consulted.")
        .def_ro("capped", &Stats::capped, "Interventions max_intervention_rate refused.")
        .def_ro("drafted", &Stats::drafted, "Speculative draft tokens proposed.")
        .def_ro("accepted", &Stats::accepted, "Draft tokens accepted.")
        .def_ro("acceptance_rate", &Stats::acceptance_rate, "accepted / drafted.")
        .def_ro("intervention_rate", &Stats::intervention_rate, "interventions / tokens.")
        .def_ro("mean_alpha", &Stats::mean_alpha, "The mean alpha over interventions.")
        .def_ro("prefill_s", &Stats::prefill_s, "Seconds reading the prompts.")
        .def_ro("generate_s", &Stats::generate_s, "Seconds generating.")
        .def_ro("tokens_per_s", &Stats::tokens_per_s, "tokens / generate_s.")
        .def_ro("finish_reason", &Stats::finish_reason, "\"stop\", \"length\" or \"context\".")
        .def_ro("warning", &Stats::warning, "Set when the guide wrote most of the text ('' otherwise).")
        .def_prop_ro("prompt_tokens", [](const Stats& s) { return by_role(s.prompt_tokens); }, "Per model.")
        .def_prop_ro("reused_tokens", [](const Stats& s) { return by_role(s.reused_tokens); },
                     "Per model: prompt tokens the KV cache already held.")
        .def_prop_ro("decode_calls", [](const Stats& s) { return by_role(s.decode_calls); }, "Per model.")
        .def_prop_ro("decoded_tokens", [](const Stats& s) { return by_role(s.decoded_tokens); }, "Per model.")
        .def("as_dict", &stats_dict, "The fields as a dict (for JSON).");
}

// ---- Engine and Scheduler: the decoding loops

nb::object engine_step(Engine& self) {
    blendin::Step s;
    bool more;
    {
        nb::gil_scoped_release release;
        more = self.step(s);
    }
    return more ? nb::cast(std::move(s)) : nb::none();
}

void bind_engine(nb::module_& m) {
    nb::class_<Engine>(m, "Engine", "The single-sequence loop over a base, an optional guide and an optional anti.")
        .def(nb::init<Model*, Model*, Model*>(), "base"_a, "guide"_a.none(), "anti"_a.none(),
             nb::keep_alive<1, 2>(), nb::keep_alive<1, 3>(), nb::keep_alive<1, 4>(),
             nb::call_guard<nb::gil_scoped_release>())
        .def("start", &Engine::start, "base_prompt"_a, "guide_prompt"_a, "params"_a,
             nb::call_guard<nb::gil_scoped_release>(), "Check the parameters and read both prompts.")
        .def("step", &engine_step, "One token as a Step, or None once the generation has finished.")
        .def("score", &Engine::score, "base_prompt"_a, "guide_prompt"_a, "continuation"_a, "params"_a,
             nb::call_guard<nb::gil_scoped_release>(),
             "Teacher forcing: the policy's Step for each token of the continuation (logprob at temperature 1).")
        .def("stats", &Engine::stats, "The statistics of the current or last generation.")
        .def("reset", &Engine::reset, nb::call_guard<nb::gil_scoped_release>(), "Empty the models' KV caches.")
        .def("check", &Engine::check, "params"_a,
             "Raise ValueError if the parameters cannot run on this engine's models (ranges, missing models, "
             "what a guide with another vocabulary cannot do).")
        .def("is_end", &Engine::is_end, "token"_a,
             "Whether the token ends a generation: the base's end tokens and a same-vocabulary guide's.")
        .def_prop_ro("bridged", &Engine::bridged, "Whether the guide has its own vocabulary (read through a bridge).")
        .def("tokens", &Engine::tokens, "role"_a, "The tokens a model has read this generation.");
}

// (id, Step, stats dict or None, the exception that ended it or None) per request that moved
nb::list scheduler_step(blendin::Scheduler& self) {
    std::vector<blendin::Scheduler::Event> events;
    {
        nb::gil_scoped_release release;
        events = self.step();
    }
    nb::list out;
    for (auto& e : events) {
        const bool done = !e.step.finish_reason.empty();
        nb::object stats = done ? nb::object(stats_dict(e.stats)) : nb::none();
        // the request's own error is a ValueError (its parameters or input), any other a BlendError
        nb::object error = e.error.empty() ? nb::none()
                           : nb::handle(e.invalid ? PyExc_ValueError : blend_error_type.ptr())(nb::str(e.error.c_str()));
        out.append(nb::make_tuple(e.id, nb::cast(std::move(e.step)), stats, error));
    }
    return out;
}

void bind_scheduler(nb::module_& m) {
    using blendin::Scheduler;
    nb::class_<Scheduler>(m, "Scheduler", "Many generations at once on one engine's models (continuous batching).")
        .def(nb::init<Engine&, int, int>(), "engine"_a, "n_slots"_a, "slot_ctx"_a, nb::keep_alive<1, 2>())
        .def("add", &Scheduler::add, "base_prompt"_a, "guide_prompt"_a, "params"_a,
             nb::call_guard<nb::gil_scoped_release>(), "Queue a generation; returns its id.")
        .def("cancel", &Scheduler::cancel, "id"_a, nb::call_guard<nb::gil_scoped_release>(),
             "End a queued or running generation.")
        .def("step", &scheduler_step,
             "Admit waiting requests, then one token for every running one: a list of "
             "(id, Step, stats when it finished else None, the exception that ended it else None).")
        .def_prop_ro("n_slots", &Scheduler::n_slots, "Generations decoded at once.")
        .def_prop_ro("slot_ctx", &Scheduler::slot_ctx, "Tokens of context per slot.")
        .def_prop_ro("running", &Scheduler::running, "Generations running.")
        .def_prop_ro("waiting", &Scheduler::waiting, "Generations queued.")
        .def_prop_ro("idle", &Scheduler::idle, "Whether nothing runs or waits.");
}

// ---- Sampler, VocabBridge, Retokenizer: parts of the loop on their own (tests, research)

using FloatRow = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

void sampler_init(blendin::Sampler* self, const GenParams& p) {
    blendin::validate(p);
    new (self) blendin::Sampler(p.sampling);
}

nb::ndarray<nb::numpy, float, nb::ndim<2>> sampler_shape(blendin::Sampler& self, FloatRow p) {
    const auto& q = self.shape(p.data(), static_cast<int>(p.shape(0)));
    return to_array(std::vector<float>(q), 1, q.size());
}

Token sampler_pick(blendin::Sampler& self, FloatRow p) { return self.pick(p.data(), static_cast<int>(p.shape(0))); }

Token sampler_residual(blendin::Sampler& self, FloatRow p, std::optional<FloatRow> q, int draft) {
    const int n = static_cast<int>(p.shape(0));
    if ((q && static_cast<int>(q->shape(0)) != n) || draft < 0 || draft >= n)
        throw blendin::ValueError("residual needs p and q of one length and a draft inside it");
    return self.residual(p.data(), q ? q->data() : nullptr, draft, n);
}

void bind_sampler(nb::module_& m) {
    nb::class_<blendin::Sampler>(m, "Sampler", "The sampler of a generation on its own (temperature, filters, draws).")
        .def("__init__", &sampler_init, "params"_a)
        .def("shape", &sampler_shape, "p"_a, "The distribution tokens are drawn from (shape (1, n)).")
        .def("pick", &sampler_pick, "p"_a, "Draw a token from p (argmax at temperature 0).")
        .def("residual", &sampler_residual, "p"_a, "q"_a.none(), "draft"_a,
             "A draw after a rejected draft: from norm(max(0, p - q)), or from p where that has no mass.");
}

void bind_vocab_bridge(nb::module_& m) {
    using blendin::VocabBridge;
    nb::class_<VocabBridge>(m, "VocabBridge", "The guide's vocabulary mapped onto the base's.")
        .def(nb::init<const Model&, const Model&>(), "base"_a, "guide"_a, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("identity", &VocabBridge::identity, "Whether the two vocabularies are the same.")
        .def_prop_ro("first_difference", &VocabBridge::first_difference, "The first difference between the two vocabularies ('' when identical), for messages.")
        .def("map", &VocabBridge::map, "Guide token id -> base token id (-1: none).")
        .def("exact", &VocabBridge::exact, "Per guide token: whether a base token has exactly its bytes.");
}

std::vector<Token> retokenizer_tokens(blendin::Retokenizer& self, nb::bytes text) {
    std::string t(text.c_str(), text.size());
    return self.tokens(t, t.size());
}

void bind_retokenizer(nb::module_& m) {
    using blendin::Retokenizer;
    nb::class_<Retokenizer>(m, "Retokenizer", "A growing text read through one model's tokenizer.")
        .def(nb::init<const Model&>(), "model"_a, nb::keep_alive<1, 2>())
        .def("tokens", &retokenizer_tokens, "text"_a, "The model's tokens of `text` (which extends the previous call's text).")
        .def("reset", &Retokenizer::reset, "Forget the text.")
        .def_prop_ro("full_passes", &Retokenizer::full_passes, "Calls that tokenized the whole text.")
        .def_prop_ro("tail_passes", &Retokenizer::tail_passes, "Calls that tokenized only the tail.");
}

// ---- best-of-N: candidates as parallel sequences, batched scoring

std::vector<double> score_continuations_of(Model* model, const std::vector<Token>& prompt,
                                       const std::vector<std::vector<Token>>& continuations, bool normalize) {
    return blendin::score_continuations(*model, prompt, continuations, normalize);
}

void bind_best_of_n(nb::module_& m) {
    using blendin::Candidate;
    nb::class_<Candidate>(m, "Candidate", "One best-of-N candidate.")
        .def_ro("tokens", &Candidate::tokens, "Its tokens (base vocabulary).")
        .def_prop_ro("text", [](const Candidate& c) { return to_text(c.text); }, "Its text.")
        .def_ro("finish_reason", &Candidate::finish_reason, "\"stop\", \"length\" or \"context\".")
        .def_ro("interventions", &Candidate::interventions, "Tokens at which the guide was consulted.");

    m.def("generate_candidates", &blendin::generate_candidates, "base"_a, "guide"_a.none(), "anti"_a.none(),
          "base_prompt"_a, "guide_prompt"_a, "params"_a, "seeds"_a, nb::call_guard<nb::gil_scoped_release>(),
          "One candidate per seed, decoded as parallel sequences; each equals a single generation with that seed.");
    m.def("score_continuations", &score_continuations_of, "model"_a, "prompt"_a, "continuations"_a, "normalize"_a,
          nb::call_guard<nb::gil_scoped_release>(),
          "A model's log-likelihood of each continuation after the prompt (per token with normalize).");
}

}  // namespace

NB_MODULE(_core, m) {
    m.doc() = "blendin_cpp native core (llama.cpp decoding loop)";
    blendin::batch_invariant_kernels();  // before llama-cpp-python, imported later, runs a matmul
    bind_functions(m);
    bind_model(m);
    bind_gen_params(m);
    bind_step(m);
    bind_stats(m);
    bind_engine(m);
    bind_scheduler(m);
    bind_sampler(m);
    bind_vocab_bridge(m);
    bind_retokenizer(m);
    bind_best_of_n(m);
}
