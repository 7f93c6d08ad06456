"""A guide with its own vocabulary re-reads the growing text through its tokenizer; the
Retokenizer tokenizes only the unsettled tail. Its tokens must always be the full tokenization's."""
import random

import pytest

import blendin_cpp as bc
from blendin_cpp.testing import make_tokenizer, random_llama

WORDS = ["the", "capital", "of", "France", "is", "Paris", "and", "it's", "don't", "1234567", "3.14", "x", "é",
         "naïve", "日本語", "🎉", "(paren)", "a,b", "--", "end.", "well...", "CamelCase", "snake_case", "1/2"]
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\t", ", ", ". ", "   ", ""]


def texts(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n))


def grow(model: bc.Model, text: str, seed: int) -> bc._core.Retokenizer:
    """Feed `text` in random slices (as generated pieces arrive) and compare at every length."""
    rt = bc._core.Retokenizer(model._handle)
    data = text.encode()
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        at = min(len(data), at + rng.randint(1, 6))
        prefix = data[:at]
        try:
            prefix.decode()
        except UnicodeDecodeError:
            continue  # the engine never gives the guide half a character
        assert rt.tokens(prefix) == model.tokenize(prefix.decode(), add_special=False), at
    return rt


@pytest.fixture(scope="module")
def bpe_model(model_dir):
    return bc.Model(random_llama(model_dir / "retok.gguf", seed=3, tokenizer=make_tokenizer(1024, seed=11)), n_ctx=64)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_tokens_equal_the_full_tokenization(bpe_model, seed):
    rt = grow(bpe_model, texts(seed), seed)
    assert rt.tail_passes > 3 * rt.full_passes  # and it did take the short way most of the time


def test_text_that_does_not_only_grow_is_tokenized_again(bpe_model):
    rt = bc._core.Retokenizer(bpe_model._handle)
    rt.tokens(b"the capital of France is")
    assert rt.tokens(b"the capital of Spain") == bpe_model.tokenize("the capital of Spain", add_special=False)
    rt.reset()
    assert rt.tokens(b"Paris") == bpe_model.tokenize("Paris", add_special=False)
