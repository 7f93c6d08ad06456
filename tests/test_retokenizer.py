"""A guide with its own vocabulary re-reads the growing text through its tokenizer; the
Retokenizer tokenizes only the unsettled tail. Its tokens must always be the full tokenization's."""
import pytest

import blendin_cpp as bc
from blendin_cpp.testing import check_retokenizer, growing_text, make_tokenizer, random_llama


@pytest.fixture(scope="module")
def bpe_model(model_dir):
    return bc.Model(random_llama(model_dir / "retok.gguf", seed=3, tokenizer=make_tokenizer(1024, seed=11)), n_ctx=64)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_tokens_equal_the_full_tokenization(bpe_model, seed):
    rt = check_retokenizer(bpe_model, growing_text(seed), seed)
    assert rt.tail_passes > 3 * rt.full_passes  # and it did take the short way most of the time


def test_text_that_does_not_only_grow_is_tokenized_again(bpe_model):
    rt = bc._core.Retokenizer(bpe_model._handle)
    rt.tokens(b"the capital of France is")
    assert rt.tokens(b"the capital of Spain") == bpe_model.tokenize("the capital of Spain", add_special=False)
    rt.reset()
    assert rt.tokens(b"Paris") == bpe_model.tokenize("Paris", add_special=False)
