// Reads the GGUF header (key/values and tensor table) with bounds checks on every length, and
// checks what llama.cpp would otherwise abort on. See the GGUF spec: magic, version, counts,
// key/value pairs, tensor infos, then aligned tensor data.
#include "gguf_check.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "error.h"
#include "ggml.h"

namespace blendin {
namespace {

enum GgufType : uint32_t {
    T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64, T_I64, T_F64,
    T_COUNT
};

size_t scalar_size(uint32_t t) {
    switch (t) {
        case T_U8: case T_I8: case T_BOOL: return 1;
        case T_U16: case T_I16: return 2;
        case T_U32: case T_I32: case T_F32: return 4;
        case T_U64: case T_I64: case T_F64: return 8;
        default: return 0;
    }
}

class Reader {
public:
    Reader(const std::string& path, uint64_t size) : path_(path), size_(size) {
        f_.reset(std::fopen(path.c_str(), "rb"));
        if (!f_) throw FileError("cannot open model file '" + path + "'");
    }
    uint64_t pos() const { return pos_; }
    uint64_t left() const { return size_ - pos_; }

    void read(void* dst, uint64_t n, const char* what) {
        if (n > left()) truncated(what);
        if (n && std::fread(dst, 1, n, f_.get()) != n) truncated(what);
        pos_ += n;
    }
    void skip(uint64_t n, const char* what) {
        if (n > left()) truncated(what);
        if (std::fseek(f_.get(), static_cast<long>(n), SEEK_CUR) != 0) truncated(what);
        pos_ += n;
    }
    template <class T> T get(const char* what) {
        T v;
        read(&v, sizeof v, what);
        return v;
    }
    std::string str(const char* what) {
        uint64_t n = get<uint64_t>(what);
        if (n > left()) truncated(what);
        std::string s(n, '\0');
        read(s.data(), n, what);
        return s;
    }
    [[noreturn]] void truncated(const char* what) {
        throw ValueError("'" + path_ + "' is truncated or corrupt: the file ends inside " + what +
                         " (at byte " + std::to_string(pos_) + " of " + std::to_string(size_) + ")");
    }

private:
    struct Closer { void operator()(std::FILE* f) const { std::fclose(f); } };
    std::unique_ptr<std::FILE, Closer> f_;
    std::string path_;
    uint64_t size_;
    uint64_t pos_ = 0;
};

struct Value {
    uint32_t type = 0;
    std::string s;        // for strings
    uint64_t u = 0;       // for integers (the raw bits, zero-extended)
    uint64_t n_items = 0; // for arrays
    uint32_t item_type = 0;             // for arrays
    std::vector<std::string> strings;   // the items of a string array that is kept (the vocabulary)
};

constexpr const char* kTokensKey = "tokenizer.ggml.tokens";

bool is_integer(uint32_t t) {
    return t == T_U8 || t == T_I8 || t == T_U16 || t == T_I16 || t == T_U32 || t == T_I32 || t == T_U64 || t == T_I64;
}

// An integer value as a signed number (the bits of a signed type are sign-extended).
long long as_signed(const Value& v) {
    switch (v.type) {
        case T_I8: return static_cast<int8_t>(v.u);
        case T_I16: return static_cast<int16_t>(v.u);
        case T_I32: return static_cast<int32_t>(v.u);
        case T_I64: return static_cast<int64_t>(v.u);
        default: return v.u > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<long long>(v.u);
    }
}

Value read_value(Reader& r, uint32_t type, const std::string& key) {
    Value v;
    v.type = type;
    if (type == T_STRING) {
        v.s = r.str(("the value of " + key).c_str());
    } else if (type == T_ARRAY) {
        uint32_t et = r.get<uint32_t>("an array header");
        v.item_type = et;
        v.n_items = r.get<uint64_t>("an array header");
        if (et == T_STRING) {
            const bool keep = key == kTokensKey;
            if (keep) v.strings.reserve(std::min<uint64_t>(v.n_items, r.left() / 8));
            for (uint64_t i = 0; i < v.n_items; ++i) {
                if (keep) {
                    v.strings.push_back(r.str("a string array"));
                    continue;
                }
                uint64_t n = r.get<uint64_t>("a string array");
                r.skip(n, "a string array");
            }
        } else if (size_t es = scalar_size(et)) {
            if (v.n_items > r.left() / es) r.truncated(("the array " + key).c_str());
            r.skip(v.n_items * es, "an array");
        } else {
            throw ValueError("metadata key '" + key + "' is an array of unsupported type " +
                             std::to_string(et) + " (corrupt GGUF?)");
        }
    } else if (size_t sz = scalar_size(type)) {
        uint64_t raw = 0;
        r.read(&raw, sz, ("the value of " + key).c_str());
        v.u = raw;
    } else {
        throw ValueError("metadata key '" + key + "' has unknown value type " + std::to_string(type) +
                         " (corrupt GGUF?)");
    }
    return v;
}

}  // namespace

GgufSummary check_gguf(const std::string& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    auto st = fs::status(path, ec);
    if (ec || !fs::exists(st)) throw FileError("model file not found: '" + path + "'");
    if (fs::is_directory(st)) throw ValueError("'" + path + "' is a directory, not a GGUF model file");
    uint64_t size = fs::file_size(path, ec);
    if (ec) throw FileError("cannot read model file '" + path + "': " + ec.message());
    if (size == 0) throw ValueError("'" + path + "' is empty, not a GGUF model file");

    Reader r(path, size);
    char magic[4] = {};
    if (size < 4) r.truncated("the GGUF magic");
    r.read(magic, 4, "the GGUF magic");
    if (std::string(magic, 4) != "GGUF")
        throw ValueError("'" + path + "' is not a GGUF file (it does not start with the GGUF magic)");
    uint32_t version = r.get<uint32_t>("the header");
    if (version < 2 || version > 3)
        throw ValueError("'" + path + "' has GGUF version " + std::to_string(version) +
                         "; only versions 2 and 3 are supported");
    uint64_t n_tensors = r.get<uint64_t>("the header");
    uint64_t n_kv = r.get<uint64_t>("the header");
    // every key/value takes at least 12 bytes and every tensor info at least 24
    if (n_kv > r.left() / 12 || n_tensors > r.left() / 24) r.truncated("the header counts");

    std::map<std::string, Value> kv;
    for (uint64_t i = 0; i < n_kv; ++i) {
        std::string key = r.str("a metadata key");
        uint32_t type = r.get<uint32_t>("a metadata type");
        kv[key] = read_value(r, type, key);
    }

    auto need = [&](const std::string& key) -> const Value& {
        auto it = kv.find(key);
        if (it == kv.end())
            throw ValueError("'" + path + "' is missing the required GGUF key '" + key + "'");
        return it->second;
    };
    GgufSummary out;
    out.architecture = need("general.architecture").s;
    out.n_tensors = static_cast<long long>(n_tensors);
    out.file_size = static_cast<long long>(size);
    const std::string& a = out.architecture;
    std::vector<std::string> required = {a + ".block_count", a + ".embedding_length",
                                         "tokenizer.ggml.model", "tokenizer.ggml.tokens"};
    if (a == "llama")
        for (const char* k : {".context_length", ".feed_forward_length", ".attention.head_count",
                              ".attention.layer_norm_rms_epsilon"})
            required.push_back(a + k);
    for (auto& k : required) need(k);
    if (need("tokenizer.ggml.model").s == "gpt2") need("tokenizer.ggml.merges");

    // llama.cpp asserts (aborting the process) on a layer count outside 1..LLAMA_MAX_LAYERS (512)
    // and on more next-token-prediction layers than layers
    constexpr long long kMaxLayers = 512;
    const std::string blocks_key = a + ".block_count";
    const Value& blocks = need(blocks_key);
    if (!is_integer(blocks.type))
        throw ValueError("'" + path + "': " + blocks_key + " must be an integer (the number of layers)");
    const long long n_layer = as_signed(blocks);
    if (n_layer < 1 || n_layer > kMaxLayers)
        throw ValueError("'" + path + "': " + blocks_key + " = " + std::to_string(n_layer) +
                         ", but llama.cpp supports 1.." + std::to_string(kMaxLayers) + " layers");
    if (auto it = kv.find(a + ".nextn_predict_layers"); it != kv.end() && is_integer(it->second.type)) {
        const long long nextn = as_signed(it->second);
        if (nextn < 0 || nextn > n_layer)
            throw ValueError("'" + path + "': " + a + ".nextn_predict_layers = " + std::to_string(nextn) +
                             " must be in 0.." + std::to_string(n_layer) + " (" + blocks_key + ")");
    }

    // llama.cpp asserts that every token string is distinct. It reads each up to its first NUL
    // byte and names an empty one "[EMPTY_<id>]": compare them as it will see them.
    const Value& vocab = need(kTokensKey);
    if (vocab.type != T_ARRAY || vocab.item_type != T_STRING)
        throw ValueError("'" + path + "': " + kTokensKey + " must be an array of strings");
    {
        std::deque<std::string> empty_names;  // stable: the map holds views of them
        std::unordered_map<std::string_view, size_t> seen;
        seen.reserve(vocab.strings.size());
        for (size_t i = 0; i < vocab.strings.size(); ++i) {
            std::string_view word(vocab.strings[i].c_str());  // up to the first NUL
            if (word.empty()) {
                empty_names.push_back("[EMPTY_" + std::to_string(i) + "]");
                word = empty_names.back();
            }
            auto [at, fresh] = seen.emplace(word, i);
            if (!fresh) {
                std::string shown(word.substr(0, 40));
                for (char& c : shown)
                    if (static_cast<unsigned char>(c) < 0x20) c = '?';
                throw ValueError("'" + path + "': " + kTokensKey + " holds one string twice: tokens " +
                                 std::to_string(at->second) + " and " + std::to_string(i) + " are both '" + shown +
                                 "' (llama.cpp needs every token to be distinct)");
            }
        }
    }
    uint64_t n_vocab = vocab.n_items;
    for (const char* id_key : {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                               "tokenizer.ggml.eot_token_id"}) {
        auto it = kv.find(id_key);
        if (it != kv.end() && scalar_size(it->second.type) && it->second.u >= n_vocab &&
            it->second.u != 0xFFFFFFFFull)
            throw ValueError("'" + path + "': " + id_key + " = " + std::to_string(it->second.u) +
                             " is outside the vocabulary of " + std::to_string(n_vocab) + " tokens");
    }

    uint64_t alignment = 32;
    if (auto it = kv.find("general.alignment"); it != kv.end()) alignment = it->second.u;
    if (alignment == 0 || (alignment & (alignment - 1)))
        throw ValueError("'" + path + "': general.alignment must be a power of two");

    struct Info { std::string name; uint64_t offset, nbytes; };
    std::vector<Info> infos;
    std::set<std::string> names;
    for (uint64_t i = 0; i < n_tensors; ++i) {
        std::string name = r.str("a tensor name");
        uint32_t n_dims = r.get<uint32_t>("a tensor info");
        if (n_dims == 0 || n_dims > GGML_MAX_DIMS)
            throw ValueError("'" + path + "': tensor '" + name + "' has " + std::to_string(n_dims) + " dimensions");
        uint64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
        for (uint32_t d = 0; d < n_dims; ++d) ne[d] = r.get<uint64_t>("a tensor shape");
        uint32_t type = r.get<uint32_t>("a tensor type");
        uint64_t offset = r.get<uint64_t>("a tensor offset");
        if (type >= GGML_TYPE_COUNT || ggml_blck_size(static_cast<ggml_type>(type)) == 0)
            throw ValueError("'" + path + "': tensor '" + name + "' has unknown type " + std::to_string(type));
        auto t = static_cast<ggml_type>(type);
        if (ne[0] % ggml_blck_size(t) != 0)
            throw ValueError("'" + path + "': tensor '" + name + "' row length is not a multiple of its block size");
        uint64_t nbytes = ggml_row_size(t, static_cast<int64_t>(ne[0]));
        for (int d = 1; d < GGML_MAX_DIMS; ++d) {
            if (ne[d] != 0 && nbytes > size / ne[d]) r.truncated(("the data of tensor " + name).c_str());
            nbytes *= ne[d];
        }
        if (!names.insert(name).second)
            throw ValueError("'" + path + "': tensor '" + name + "' appears twice");
        // llama.cpp loads half-precision norm weights, then aborts on the first decode.
        bool is_norm = name.size() > 12 && name.compare(name.size() - 12, 12, "_norm.weight") == 0;
        if (is_norm && t != GGML_TYPE_F32)
            throw ValueError("'" + path + "': norm tensor '" + name + "' is " + ggml_type_name(t) +
                             "; llama.cpp needs f32 norm weights");
        infos.push_back({name, offset, nbytes});
    }
    uint64_t data_start = (r.pos() + alignment - 1) / alignment * alignment;
    for (auto& t : infos) {
        if (t.offset > size || data_start + t.offset > size || t.nbytes > size - data_start - t.offset)
            throw ValueError("'" + path + "' is truncated: the data of tensor '" + t.name +
                             "' ends past the end of the file (" + std::to_string(size) + " bytes)");
    }
    return out;
}

}  // namespace blendin
