// The nanobind module: the only file that knows Python. Converts types and exceptions; every
// call that decodes releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>

#include "batch.h"
#include "engine.h"
#include "error.h"
#include "gguf_check.h"
#include "model.h"

namespace nb = nanobind;
using namespace nb::literals;
using blendin::Engine;
using blendin::Model;
using blendin::Token;

namespace {

nb::bytes to_bytes(const std::string& s) { return nb::bytes(s.data(), s.size()); }

// Logits rows as a fresh float32 numpy array of shape (rows, n_vocab) that owns its memory.
nb::ndarray<nb::numpy, float, nb::ndim<2>> to_array(std::vector<float>&& v, size_t rows, size_t cols) {
    auto* data = new std::vector<float>(std::move(v));
    nb::capsule owner(data, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    return nb::ndarray<nb::numpy, float, nb::ndim<2>>(data->data(), {rows, cols}, owner);
}

// Logits of every position of `tokens` for sequence 0, decoded from an empty cache (a helper for
// tests and research; the engine never copies logits like this).
std::vector<float> all_logits(Model& m, const std::vector<Token>& tokens) {
    m.check_tokens(tokens);
    if (tokens.empty()) throw blendin::ValueError("logits() needs at least one token");
    if (static_cast<int>(tokens.size()) > m.n_ctx())
        throw blendin::ValueError(std::to_string(tokens.size()) + " tokens do not fit the context of " +
                                  std::to_string(m.n_ctx()));
    const size_t nv = m.n_vocab();
    std::vector<float> out(tokens.size() * nv);
    m.truncate(-1, 0);
    std::vector<blendin::BatchItem> batch;
    for (size_t start = 0; start < tokens.size(); start += m.n_batch()) {
        size_t end = std::min(tokens.size(), start + m.n_batch());
        batch.clear();
        for (size_t i = start; i < end; ++i) batch.push_back({tokens[i], static_cast<int>(i), 0, true});
        m.decode(batch);
        for (size_t i = start; i < end; ++i) std::memcpy(&out[i * nv], m.logits(static_cast<int>(i - start)), nv * sizeof(float));
    }
    return out;
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

    nb::class_<Model>(m, "Model")
        .def("__init__", [](Model* self, const std::string& path, int n_ctx, int n_batch, int n_seq_max,
                            int n_gpu_layers, int n_threads, const std::string& kv_type,
                            const std::vector<std::pair<std::string, float>>& adapters) {
                 blendin::ModelParams p{n_ctx, n_batch, n_seq_max, n_gpu_layers, n_threads, kv_type};
                 nb::gil_scoped_release release;
                 new (self) Model(path, p, adapters);
             },
             "path"_a, "n_ctx"_a, "n_batch"_a, "n_seq_max"_a, "n_gpu_layers"_a, "n_threads"_a, "kv_type"_a,
             "adapters"_a)
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
        .def("is_eog", &Model::is_eog, "token"_a)
        .def("is_control", &Model::is_control, "token"_a)
        .def("tokenize", &Model::tokenize, "text"_a, "add_special"_a, "parse_special"_a)
        .def("detokenize", [](const Model& self, const std::vector<Token>& tokens, bool remove_special,
                              bool unparse_special) {
                 return to_bytes(self.detokenize(tokens, remove_special, unparse_special));
             }, "tokens"_a, "remove_special"_a, "unparse_special"_a)
        .def("piece", [](const Model& self, Token t, bool special) { return to_bytes(self.piece(t, special)); },
             "token"_a, "special"_a)
        .def("meta", &Model::meta, "key"_a)
        .def("metadata", &Model::metadata)
        .def("decode", [](Model& self, const std::vector<Token>& tokens, const std::vector<int>& pos,
                          const std::vector<int>& seq, const std::vector<bool>& want_logits) {
                 size_t n = tokens.size();
                 if (pos.size() != n || seq.size() != n || want_logits.size() != n)
                     throw blendin::ValueError("tokens, positions, sequences and logits flags must have the same length");
                 std::vector<blendin::BatchItem> batch(n);
                 for (size_t i = 0; i < n; ++i) batch[i] = {tokens[i], pos[i], seq[i], static_cast<bool>(want_logits[i])};
                 nb::gil_scoped_release release;
                 self.decode(batch);
             }, "tokens"_a, "positions"_a, "sequences"_a, "logits"_a)
        .def("logits_row", [](const Model& self, int i) {
                 const float* row = self.logits(i);
                 return to_array(std::vector<float>(row, row + self.n_vocab()), 1, self.n_vocab());
             }, "i"_a)
        .def("logits", [](Model& self, const std::vector<Token>& tokens) {
                 std::vector<float> v;
                 {
                     nb::gil_scoped_release release;
                     v = all_logits(self, tokens);
                 }
                 return to_array(std::move(v), tokens.size(), self.n_vocab());
             }, "tokens"_a)
        .def("truncate", &Model::truncate, "seq"_a, "n_keep"_a)
        .def("adapter_scales", &Model::adapter_scales)
        .def("set_adapter_scales", &Model::set_adapter_scales, "scales"_a, nb::call_guard<nb::gil_scoped_release>());

    nb::class_<blendin::GenParams>(m, "GenParams")
        .def("__init__", [](blendin::GenParams* self, const std::string& method, float gamma, float alpha, float beta,
                            float lambda_, float max_intervention_rate, int overlap_k, float temperature, int top_k,
                            float top_p, float min_p, uint64_t seed, int max_tokens,
                            const std::vector<std::string>& stop, bool lazy, float warn_intervention_rate,
                            int top_logprobs, bool speculative, int draft_max, bool ignore_eos) {
                 blendin::GenParams p;
                 p.policy = {blendin::method_from_name(method), gamma, alpha, beta, lambda_, max_intervention_rate, overlap_k};
                 p.sampling = {temperature, top_k, top_p, min_p, seed};
                 p.max_tokens = max_tokens;
                 p.stop = stop;
                 p.lazy = lazy;
                 p.warn_intervention_rate = warn_intervention_rate;
                 p.top_logprobs = top_logprobs;
                 p.speculative = speculative;
                 p.draft_max = draft_max;
                 p.ignore_eos = ignore_eos;
                 new (self) blendin::GenParams(std::move(p));
             },
             "method"_a, "gamma"_a, "alpha"_a, "beta"_a, "lambda_"_a, "max_intervention_rate"_a, "overlap_k"_a,
             "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a, "seed"_a, "max_tokens"_a, "stop"_a, "lazy"_a,
             "warn_intervention_rate"_a, "top_logprobs"_a = 0, "speculative"_a = false, "draft_max"_a = 8,
             "ignore_eos"_a = false);

    // One step as a tuple: (token, text bytes, source, pb_max, pg_max, alpha, agree, overlap,
    // intervened, finish_reason, logprob, top_logprobs, guide_rank, mass_above, unmatched) --
    // cheaper than an object per token.
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
                 if (!more) return nb::none();
                 const auto& i = s.info;
                 return nb::make_tuple(s.token, to_bytes(s.text), blendin::source_name(i.source), i.pb_max, i.pg_max,
                                       i.alpha, i.agree, i.overlap, i.intervened, s.finish_reason, s.logprob,
                                       s.top_logprobs, i.guide_rank, i.mass_above, i.unmatched);
             })
        .def("stats", [](const Engine& self) {
                 blendin::Stats s = self.stats();
                 nb::dict d;
                 d["tokens"] = s.tokens;
                 d["interventions"] = s.interventions;
                 d["capped"] = s.capped;
                 d["drafted"] = s.drafted;
                 d["accepted"] = s.accepted;
                 d["acceptance_rate"] = s.drafted ? static_cast<double>(s.accepted) / s.drafted : 0.0;
                 d["intervention_rate"] = s.intervention_rate;
                 d["mean_alpha"] = s.mean_alpha;
                 const char* roles[] = {"base", "guide", "anti"};
                 nb::dict prompt, reused, calls, decoded;
                 for (int r = 0; r < blendin::kRoles; ++r) {
                     prompt[roles[r]] = s.prompt_tokens[r];
                     reused[roles[r]] = s.reused_tokens[r];
                     calls[roles[r]] = s.decode_calls[r];
                     decoded[roles[r]] = s.decoded_tokens[r];
                 }
                 d["prompt_tokens"] = prompt;
                 d["reused_tokens"] = reused;
                 d["decode_calls"] = calls;
                 d["decoded_tokens"] = decoded;
                 d["prefill_s"] = s.prefill_s;
                 d["generate_s"] = s.generate_s;
                 d["tokens_per_s"] = s.tokens_per_s;
                 d["finish_reason"] = s.finish_reason;
                 d["warning"] = s.warning;
                 return d;
             })
        .def("reset", &Engine::reset, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("bridged", &Engine::bridged)
        .def("tokens", &Engine::tokens, "role"_a);

    nb::class_<blendin::VocabBridge>(m, "VocabBridge")
        .def(nb::init<const Model&, const Model&>(), "base"_a, "guide"_a, nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("identity", &blendin::VocabBridge::identity)
        .def_prop_ro("first_difference", &blendin::VocabBridge::first_difference)
        .def("map", &blendin::VocabBridge::map)
        .def("exact", &blendin::VocabBridge::exact);

    m.def("generate_candidates", [](Model* base, Model* guide, Model* anti, const std::vector<Token>& base_prompt,
                                    const std::vector<Token>& guide_prompt, const blendin::GenParams& params,
                                    const std::vector<uint64_t>& seeds) {
              std::vector<blendin::Candidate> cands;
              {
                  nb::gil_scoped_release release;
                  cands = blendin::generate_candidates(*base, guide, anti, base_prompt, guide_prompt, params, seeds);
              }
              nb::list out;
              for (auto& c : cands)
                  out.append(nb::make_tuple(c.tokens, to_bytes(c.text), c.finish_reason, c.steps, c.interventions));
              return out;
          }, "base"_a, "guide"_a.none(), "anti"_a.none(), "base_prompt"_a, "guide_prompt"_a, "params"_a, "seeds"_a);
    m.def("score_continuations", [](Model* model, const std::vector<Token>& prompt,
                                    const std::vector<std::vector<Token>>& continuations, bool normalize) {
              return blendin::score_continuations(*model, prompt, continuations, normalize);
          }, "model"_a, "prompt"_a, "continuations"_a, "normalize"_a, nb::call_guard<nb::gil_scoped_release>());
}
