"""Session fixtures: small generated GGUF models (random weights, real byte-level BPE tokenizer)."""
import pytest

from blendin_cpp.testing import make_tokenizer, random_llama


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def shared_tokenizer():
    return make_tokenizer(1024, seed=7)


@pytest.fixture(scope="session")
def tiny_model(model_dir, shared_tokenizer):
    """64 wide x 2 layers, 4 heads, untied output, f32."""
    return str(random_llama(model_dir / "tiny.gguf", n_embd=64, n_layer=2, n_head=4, seed=1,
                            tokenizer=shared_tokenizer))


@pytest.fixture(scope="session")
def gqa_model(model_dir, shared_tokenizer):
    """Another shape: 96 wide x 3 layers, 6 heads over 2 KV heads, tied output, f16 matrices."""
    return str(random_llama(model_dir / "gqa.gguf", n_embd=96, n_layer=3, n_head=6, n_head_kv=2,
                            tied_output=True, dtype="f16", seed=2, tokenizer=shared_tokenizer))


@pytest.fixture(scope="session")
def model_trio(model_dir, shared_tokenizer):
    """make(prefix, seed) -> paths of a confident-ish random base (64 x 2, logit_std 5) and two
    small, different guides (32 x 1) on the shared vocabulary: "base", "guide", "anti"."""
    def make(prefix: str, seed: int) -> dict:
        small = dict(n_embd=32, n_layer=1, n_head=2, logit_std=4, tokenizer=shared_tokenizer)
        return {
            "base": str(random_llama(model_dir / f"{prefix}_base.gguf", n_embd=64, n_layer=2, seed=seed,
                                     logit_std=5, tokenizer=shared_tokenizer)),
            "guide": str(random_llama(model_dir / f"{prefix}_guide.gguf", seed=seed + 1, **small)),
            "anti": str(random_llama(model_dir / f"{prefix}_anti.gguf", seed=seed + 2, **small)),
        }
    return make
