// The nanobind module: the only file that knows Python. Converts types and exceptions; every
// call that decodes releases the GIL. What Python reads of a Model's or an Engine's state is a
// copy taken under its lease (Lease::Read): another thread's call on it meanwhile makes the read
// raise the busy error, never return half-changed state.
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
    if (static_cast<int>(tokens.size()) > m.n_ctx())
        throw blendin::ValueError(std::to_string(tokens.size()) + " tokens do not fit the context of " +
                                  std::to_string(m.n_ctx()));
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

}  // namespace

NB_MODULE(_core, m) {
    m.doc() = "blendin_cpp native core (llama.cpp decoding loop)";

    static nb::exception<blendin::Error> blend_error(m, "BlendError", PyExc_RuntimeError);
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
    m.def("check_gguf", [](const std::string& path) {
        auto s = blendin::check_gguf(path);
        return nb::make_tuple(s.architecture, s.n_tensors, s.file_size);
    }, "path"_a, nb::call_guard<nb::gil_scoped_release>());
    m.def("cpu_extra_buffer_types", &blendin::cpu_extra_buffer_types,
          "The CPU backend's extra weight buffer types in this build on this CPU (e.g. AMX, CPU_REPACK).");
    m.def("gpu_devices", &blendin::gpu_devices,
          "The GPUs this llama.cpp build can use here ('CUDA0: NVIDIA H200, 143771 MiB'); empty without one.");
    m.def("use_extra_buffer_types", &blendin::use_extra_buffer_types, "amx"_a,
          "Whether a load uses the extra buffer types: not where AMX is offered, unless amx is true.");
    m.def("rpc_available", &blendin::rpc::available, "Whether this llama.cpp build has the RPC backend.");
    m.def("rpc_failure", &blendin::rpc::failure, "The first RPC failure of this process ('' if none).");
    m.def("rpc_serve", &blendin::rpc::serve, "endpoint"_a, "cache_dir"_a, "n_threads"_a,
          nb::call_guard<nb::gil_scoped_release>(), "Run ggml's RPC server on this CPU (returns only on failure).");
    m.def("methods", &blendin::method_names, "The method names, in the core's order.");
    m.def("param_ranges", [] {
        nb::dict d;
        for (const auto& r : blendin::param_ranges())
            d[r.name.c_str()] = nb::make_tuple(r.lo, r.hi, r.lo_open, r.hi_open, r.integer, r.text());
        return d;
    }, "name -> (lo, hi, lo_open, hi_open, integer, text): the valid range of each numeric parameter.");

    nb::class_<Model>(m, "Model")
        .def("__init__", [](Model* self, const std::string& path, int n_ctx, int n_batch, int n_seq_max,
                            int n_gpu_layers, int n_threads, const std::string& kv_type,
                            const std::vector<std::pair<std::string, float>>& adapters, bool amx,
                            const std::vector<std::string>& rpc) {
                 blendin::ModelParams p{n_ctx, n_batch, n_seq_max, n_gpu_layers, n_threads, kv_type, amx, rpc};
                 nb::gil_scoped_release release;
                 new (self) Model(path, p, adapters);
             },
             "path"_a, "n_ctx"_a, "n_batch"_a, "n_seq_max"_a, "n_gpu_layers"_a, "n_threads"_a, "kv_type"_a,
             "adapters"_a, "amx"_a, "rpc"_a)
        .def_prop_ro("n_vocab", &Model::n_vocab)
        .def_prop_ro("n_ctx", &Model::n_ctx)
        .def_prop_ro("n_ctx_train", &Model::n_ctx_train)
        .def_prop_ro("n_batch", &Model::n_batch)
        .def_prop_ro("n_seq_max", &Model::n_seq_max)
        .def_prop_ro("n_embd", &Model::n_embd)
        .def_prop_ro("bos", &Model::bos)
        .def_prop_ro("eos", &Model::eos)
        .def_prop_ro("eot", &Model::eot)
        .def_prop_ro("add_bos", &Model::add_bos)
        .def_prop_ro("path", &Model::path)
        .def_prop_ro("architecture", &Model::architecture)
        .def_prop_ro("chat_template", &Model::chat_template)
        .def_prop_ro("description", &Model::description)
        .def_prop_ro("n_params", &Model::n_params)
        .def_prop_ro("model_size", &Model::model_size)
        .def_prop_ro("file_size", &Model::file_size)
        .def_prop_ro("n_adapters", &Model::n_adapters)
        .def_prop_ro("decode_calls", &Model::decode_calls)
        .def_prop_ro("decoded_tokens", &Model::decoded_tokens)
        .def_prop_ro("rpc", &Model::rpc)
        .def_prop_ro("buffer_types", &Model::buffer_types, "(name, MiB) of each buffer llama.cpp put weights in.")
        .def_prop_ro("kv_mib", &Model::kv_mib, "The KV cache's memory in MiB (all sequences).")
        .def("is_eog", &Model::is_eog, "token"_a)
        .def("is_control", &Model::is_control, "token"_a)
        // tokenizing reads only the vocabulary; a long text takes long (llama.cpp's special-token
        // parsing is quadratic in the markers it finds): other threads run meanwhile
        .def("tokenize", &Model::tokenize, "text"_a, "add_special"_a, "parse_special"_a,
             nb::call_guard<nb::gil_scoped_release>())
        .def("detokenize", [](const Model& self, const std::vector<Token>& tokens, bool remove_special,
                              bool unparse_special) {
                 std::string text;
                 {
                     nb::gil_scoped_release release;
                     text = self.detokenize(tokens, remove_special, unparse_special);
                 }
                 return to_bytes(text);
             }, "tokens"_a, "remove_special"_a, "unparse_special"_a)
        .def("piece", [](const Model& self, Token t, bool special) { return to_bytes(self.piece(t, special)); },
             "token"_a, "special"_a)
        .def("meta", &Model::meta, "key"_a)
        .def("metadata", &Model::metadata)
        .def("tokens", [](const Model& self, int seq) {
                 blendin::Lease::Read read(self.lease(), self.name());
                 return self.tokens(seq);  // a copy
             }, "seq"_a, "What a sequence of the KV cache holds.")
        .def("decode", &decode_at, "tokens"_a, "positions"_a, "sequences"_a, "logits"_a)
        .def("logits_row", [](const Model& self, int i) {
                 std::vector<float> copy;
                 {
                     blendin::Lease::Read read(self.lease(), self.name());
                     const float* row = self.logits(i);
                     copy.assign(row, row + self.n_vocab());
                 }
                 return to_array(std::move(copy), 1, self.n_vocab());
             }, "i"_a)
        .def("logits", [](Model& self, const std::vector<Token>& tokens) {
                 std::vector<float> v;
                 {
                     nb::gil_scoped_release release;
                     v = all_logits(self, tokens);
                 }
                 return to_array(std::move(v), tokens.size(), self.n_vocab());
             }, "tokens"_a)
        .def("truncate", &Model::truncate, "seq"_a, "n_keep"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("copy_seq", &Model::copy_seq, "src"_a, "dst"_a, "n"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("decode_seconds", &Model::decode_seconds, "k"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Seconds a decode of k tokens with logits on every row takes (measured once, then interpolated).")
        .def("adapter_scales", &Model::adapter_scales)
        .def("set_adapter_scales", &Model::set_adapter_scales, "scales"_a, nb::call_guard<nb::gil_scoped_release>());

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
        .def_prop_rw("diagnostics", [](const GenParams& p) { return p.policy.diagnostics; },
                     [](GenParams& p, bool v) { p.policy.diagnostics = v; })
        .def_prop_rw("temperature", [](const GenParams& p) { return p.sampling.temperature; },
                     [](GenParams& p, float v) { p.sampling.temperature = v; })
        .def_prop_rw("top_k", [](const GenParams& p) { return p.sampling.top_k; }, [](GenParams& p, int v) { p.sampling.top_k = v; })
        .def_prop_rw("top_p", [](const GenParams& p) { return p.sampling.top_p; }, [](GenParams& p, float v) { p.sampling.top_p = v; })
        .def_prop_rw("min_p", [](const GenParams& p) { return p.sampling.min_p; }, [](GenParams& p, float v) { p.sampling.min_p = v; })
        .def_prop_rw("seed", [](const GenParams& p) { return p.sampling.seed; },
                     [](GenParams& p, nb::int_ v) {
                         const unsigned long long seed = PyLong_AsUnsignedLongLong(v.ptr());
                         if (PyErr_Occurred()) {  // negative or too big
                             PyErr_Clear();
                             throw blendin::ValueError("seed must be an integer " +
                                                       blendin::param_range("seed").text() + " and below 2^64");
                         }
                         p.sampling.seed = seed;
                     })
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
        .def("validate", [](const GenParams& p) { blendin::validate(p); });

    nb::class_<blendin::Step>(m, "Step",
                              "One generated token and why it was chosen. `source` is \"base\" (the base alone), "
                              "\"blend\" (a mixture) or \"guide\" (the guide alone); numbers are None where not computed.")
        .def_prop_ro("token", [](const blendin::Step& s) { return s.token; })
        .def_prop_ro("text", [](const blendin::Step& s) { return to_text(s.text); }, "the text this step releases")
        .def_prop_ro("text_bytes", [](const blendin::Step& s) { return to_bytes(s.text); },
                     "the same as bytes (a model may write invalid UTF-8, which `text` shows as U+FFFD)")
        .def_prop_ro("source", [](const blendin::Step& s) { return blendin::source_name(s.info.source); })
        .def_prop_ro("intervened", [](const blendin::Step& s) { return s.info.intervened; })
        .def_prop_ro("capped", [](const blendin::Step& s) { return s.info.capped; })
        .def_prop_ro("pb_max", [](const blendin::Step& s) { return maybe(s.info.pb_max); })
        .def_prop_ro("pg_max", [](const blendin::Step& s) { return maybe(s.info.pg_max); })
        .def_prop_ro("alpha", [](const blendin::Step& s) { return maybe(s.info.alpha); })
        .def_prop_ro("agree", [](const blendin::Step& s) { return maybe(s.info.agree); })
        .def_prop_ro("overlap", [](const blendin::Step& s) { return maybe(s.info.overlap); })
        .def_prop_ro("guide_rank", [](const blendin::Step& s) {
            return s.info.guide_rank ? std::optional<int>(s.info.guide_rank) : std::nullopt;
        })
        .def_prop_ro("mass_above", [](const blendin::Step& s) { return maybe(s.info.mass_above); })
        .def_prop_ro("unmatched", [](const blendin::Step& s) { return maybe(s.info.unmatched); })
        .def_prop_ro("logprob", [](const blendin::Step& s) { return s.logprob; },
                     "log p(token) under the final distribution (temperature 1)")
        .def_prop_ro("top_logprobs", [](const blendin::Step& s) { return s.top_logprobs; },
                     "with top_logprobs=N: the N likeliest (token, logprob), best first")
        .def_prop_ro("finish_reason", [](const blendin::Step& s) {
            return s.finish_reason.empty() ? std::nullopt : std::optional<std::string>(s.finish_reason);
        })
        .def("as_dict", [](nb::handle self) {
            nb::dict d;
            for (const char* name : {"token", "text", "source", "pb_max", "pg_max", "alpha", "agree", "overlap",
                                     "intervened", "finish_reason", "logprob", "top_logprobs", "guide_rank",
                                     "mass_above", "unmatched"})
                d[name] = self.attr(name);
            return d;
        }, "The fields as a dict (for JSON).")
        .def("__repr__", [](nb::handle self) {
            return nb::str("Step(token={}, text={!r}, source={!r})")
                .format(self.attr("token"), self.attr("text"), self.attr("source"));
        });

    nb::class_<blendin::Stats>(m, "Stats", "The statistics of one generation (as_dict(): the JSON form).")
        .def_ro("tokens", &blendin::Stats::tokens)
        .def_ro("interventions", &blendin::Stats::interventions)
        .def_ro("capped", &blendin::Stats::capped)
        .def_ro("drafted", &blendin::Stats::drafted)
        .def_ro("accepted", &blendin::Stats::accepted)
        .def_ro("acceptance_rate", &blendin::Stats::acceptance_rate)
        .def_ro("intervention_rate", &blendin::Stats::intervention_rate)
        .def_ro("mean_alpha", &blendin::Stats::mean_alpha)
        .def_ro("prefill_s", &blendin::Stats::prefill_s)
        .def_ro("generate_s", &blendin::Stats::generate_s)
        .def_ro("tokens_per_s", &blendin::Stats::tokens_per_s)
        .def_ro("finish_reason", &blendin::Stats::finish_reason)
        .def_ro("warning", &blendin::Stats::warning)
        .def_prop_ro("prompt_tokens", [](const blendin::Stats& s) { return by_role(s.prompt_tokens); })
        .def_prop_ro("reused_tokens", [](const blendin::Stats& s) { return by_role(s.reused_tokens); })
        .def_prop_ro("decode_calls", [](const blendin::Stats& s) { return by_role(s.decode_calls); })
        .def_prop_ro("decoded_tokens", [](const blendin::Stats& s) { return by_role(s.decoded_tokens); })
        .def("as_dict", &stats_dict);

    nb::class_<Engine>(m, "Engine")
        .def(nb::init<Model*, Model*, Model*>(), "base"_a, "guide"_a.none(), "anti"_a.none(),
             nb::keep_alive<1, 2>(), nb::keep_alive<1, 3>(), nb::keep_alive<1, 4>(),
             nb::call_guard<nb::gil_scoped_release>())
        .def("start", &Engine::start, "base_prompt"_a, "guide_prompt"_a, "params"_a,
             nb::call_guard<nb::gil_scoped_release>())
        .def("step", [](Engine& self) -> nb::object {
                 blendin::Step s;
                 bool more;
                 {
                     nb::gil_scoped_release release;
                     more = self.step(s);
                 }
                 return more ? nb::cast(std::move(s)) : nb::none();
             })
        .def("score", [](Engine& self, const std::vector<Token>& base_prompt, const std::vector<Token>& guide_prompt,
                         const std::vector<Token>& continuation, const GenParams& params) {
                 return self.score(base_prompt, guide_prompt, continuation, params);
             }, "base_prompt"_a, "guide_prompt"_a, "continuation"_a, "params"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Teacher forcing: the policy's Step for each token of the continuation (logprob at temperature 1).")
        .def("stats", &Engine::stats)
        .def("reset", &Engine::reset, nb::call_guard<nb::gil_scoped_release>())
        .def("check", &Engine::check, "params"_a,
             "Raise ValueError if the parameters cannot run on this engine's models (ranges, missing models, "
             "what a guide with another vocabulary cannot do).")
        .def("is_end", &Engine::is_end, "token"_a,
             "Whether the token ends a generation: the base's end tokens and a same-vocabulary guide's.")
        .def_prop_ro("bridged", &Engine::bridged)
        .def("tokens", &Engine::tokens, "role"_a);

    using blendin::Scheduler;
    nb::class_<Scheduler>(m, "Scheduler", "Many generations at once on one engine's models (continuous batching).")
        .def(nb::init<Engine&, int, int>(), "engine"_a, "n_slots"_a, "slot_ctx"_a, nb::keep_alive<1, 2>())
        .def("add", &Scheduler::add, "base_prompt"_a, "guide_prompt"_a, "params"_a,
             nb::call_guard<nb::gil_scoped_release>(), "Queue a generation; returns its id.")
        .def("cancel", &Scheduler::cancel, "id"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("step", [](Scheduler& self) {
                 std::vector<Scheduler::Event> events;
                 {
                     nb::gil_scoped_release release;
                     events = self.step();
                 }
                 // (id, Step, stats dict or None, error or None) per request that moved
                 nb::list out;
                 for (auto& e : events) {
                     const bool done = !e.step.finish_reason.empty();
                     nb::object stats = done ? nb::object(stats_dict(e.stats)) : nb::none();
                     nb::object error = e.error.empty() ? nb::none() : nb::object(nb::str(e.error.c_str()));
                     out.append(nb::make_tuple(e.id, nb::cast(std::move(e.step)), stats, error));
                 }
                 return out;
             }, "Admit waiting requests, then one token for every running one: a list of "
                "(id, Step, stats when it finished else None, error when it failed else None).")
        .def_prop_ro("n_slots", &Scheduler::n_slots)
        .def_prop_ro("slot_ctx", &Scheduler::slot_ctx)
        .def_prop_ro("running", &Scheduler::running)
        .def_prop_ro("waiting", &Scheduler::waiting)
        .def_prop_ro("idle", &Scheduler::idle);

    using FloatRow = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
    nb::class_<blendin::Sampler>(m, "Sampler", "The sampler of a generation on its own (temperature, filters, draws).")
        .def("__init__", [](blendin::Sampler* self, const GenParams& p) {
                 blendin::validate(p);
                 new (self) blendin::Sampler(p.sampling);
             }, "params"_a)
        .def("shape", [](blendin::Sampler& self, FloatRow p) {
                 const auto& q = self.shape(p.data(), static_cast<int>(p.shape(0)));
                 return to_array(std::vector<float>(q), 1, q.size());
             }, "p"_a, "The distribution tokens are drawn from (shape (1, n)).")
        .def("pick", [](blendin::Sampler& self, FloatRow p) {
                 return self.pick(p.data(), static_cast<int>(p.shape(0)));
             }, "p"_a)
        .def("residual", [](blendin::Sampler& self, FloatRow p, std::optional<FloatRow> q, int draft) {
                 const int n = static_cast<int>(p.shape(0));
                 if ((q && static_cast<int>(q->shape(0)) != n) || draft < 0 || draft >= n)
                     throw blendin::ValueError("residual needs p and q of one length and a draft inside it");
                 return self.residual(p.data(), q ? q->data() : nullptr, draft, n);
             }, "p"_a, "q"_a.none(), "draft"_a,
             "A draw after a rejected draft: from norm(max(0, p - q)), or from p where that has no mass.");

    nb::class_<blendin::VocabBridge>(m, "VocabBridge")
        .def(nb::init<const Model&, const Model&>(), "base"_a, "guide"_a, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("identity", &blendin::VocabBridge::identity)
        .def_prop_ro("first_difference", &blendin::VocabBridge::first_difference)
        .def("map", &blendin::VocabBridge::map)
        .def("exact", &blendin::VocabBridge::exact);

    nb::class_<blendin::Retokenizer>(m, "Retokenizer", "A growing text read through one model's tokenizer.")
        .def(nb::init<const Model&>(), "model"_a, nb::keep_alive<1, 2>())
        .def("tokens", [](blendin::Retokenizer& self, nb::bytes text) {
                 std::string t(text.c_str(), text.size());
                 return self.tokens(t, t.size());
             }, "text"_a, "The model's tokens of `text` (which extends the previous call's text).")
        .def("reset", &blendin::Retokenizer::reset)
        .def_prop_ro("full_passes", &blendin::Retokenizer::full_passes)
        .def_prop_ro("tail_passes", &blendin::Retokenizer::tail_passes);

    nb::class_<blendin::Candidate>(m, "Candidate")
        .def_ro("tokens", &blendin::Candidate::tokens)
        .def_prop_ro("text", [](const blendin::Candidate& c) { return to_text(c.text); })
        .def_ro("finish_reason", &blendin::Candidate::finish_reason)
        .def_ro("interventions", &blendin::Candidate::interventions);

    m.def("generate_candidates", &blendin::generate_candidates, "base"_a, "guide"_a.none(), "anti"_a.none(),
          "base_prompt"_a, "guide_prompt"_a, "params"_a, "seeds"_a, nb::call_guard<nb::gil_scoped_release>());
    m.def("score_continuations", [](Model* model, const std::vector<Token>& prompt,
                                    const std::vector<std::vector<Token>>& continuations, bool normalize) {
              return blendin::score_continuations(*model, prompt, continuations, normalize);
          }, "model"_a, "prompt"_a, "continuations"_a, "normalize"_a, nb::call_guard<nb::gil_scoped_release>());
}
