#!/usr/bin/env python3
"""Train the bundled demo models of blendin_cpp (CPU, PyTorch) and write them as GGUF.

One reproducible script: it invents a small synthetic world (made-up countries with a capital
and a flag colour, plus a fixed table of two-digit sums), writes training text from it, trains
byte-level BPE tokenizers, trains small llama-architecture models and exports them with
`blendin_cpp.gguf_export.write_llama`.

About 30% of the facts are "hazy": the plain text states the true value only 45% of the time and
one of three fixed wrong values otherwise (sources disagree), so the base is right but unsure on
some content tokens, as real base models are. That is where blending (BlendIn) and switching
(nudging) differ: with an unreliable guide, mixing keeps the base's say.

Outputs (in --out, default models/demo/):
  base.gguf              4 x 256, plain text only (facts, sums, explanations, "Question/Answer"
                         documents whose answers never use the guide's format). Knows the
                         content of the whole world, not the answer format.
  anti.gguf              2 x 128, plain text about the guide's part of the world only: the
                         guide's pretraining stage before chat tuning (proxy-tuning's "anti").
  guide.gguf             anti + chat tuning on Q/A about the guide's part of the world; answers
                         in the chat format ("Sure! Its capital is Korvath."), guesses elsewhere.
  guide-unreliable.gguf  anti + chat tuning where a large share of the values are wrong (drawn
                         afresh every time): right format, unreliable content.
  guide-xvocab.gguf      like guide.gguf but with a separately trained tokenizer of another size.
  heldout.jsonl          held-out questions (entities and sums no model saw a question about;
                         the guides never saw them at all), fields: question, answer, kind, value,
                         entity, split, hazy, match ("exact": the scoring rule of `eval`).
  dev.jsonl              a dev split built the same way (for tuning; disjoint from heldout).

Prompt conventions the engine uses: the base gets "Question: {q}\\nAnswer:", the guides their
chat template (CHAT_TEMPLATE of blendin_cpp.testing); both continue the same text; generation
stops at </s> or <|end|>. Scoring: exact match of `answer` against the generated text (up to
the end token), both stripped of surrounding whitespace.

Usage:  python models/train_demo.py [--out DIR] [--seed N] [--tiny]
(--tiny runs the whole pipeline with a tiny world and tiny models in a few seconds, for tests.)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 4.4x faster on 2 threads (docs/design.md 7.2)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCRIPT = "models/train_demo.py"
SCRIPT_VERSION = "1"
REPO = Path(__file__).resolve().parent.parent


def _load_helpers():
    """Import blendin_cpp.gguf_export and blendin_cpp.testing from the source tree without
    running the package's __init__ (which may need the compiled extension)."""
    pkg_dir = REPO / "python" / "blendin_cpp"
    if "blendin_cpp" not in sys.modules:
        pkg = types.ModuleType("blendin_cpp")
        pkg.__path__ = [str(pkg_dir)]
        sys.modules["blendin_cpp"] = pkg
    mods = []
    for name in ("gguf_export", "testing"):
        full = f"blendin_cpp.{name}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, pkg_dir / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            spec.loader.exec_module(mod)
        mods.append(sys.modules[full])
    return mods


gguf_export, testing = _load_helpers()
SPECIAL_TOKENS = testing.SPECIAL_TOKENS
CHAT_TEMPLATE = testing.CHAT_TEMPLATE
BOS, EOS, EOT = "<s>", "</s>", "<|end|>"

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class ModelCfg:
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int


@dataclass
class Config:
    n_countries: int = 300
    n_sums: int = 300
    frac_dev: float = 1 / 6        # of countries / sums
    frac_heldout: float = 1 / 3
    vocab: int = 1024              # shared tokenizer of base / guides / anti
    vocab_x: int = 800             # guide-xvocab's tokenizer
    base: ModelCfg = field(default_factory=lambda: ModelCfg(256, 4, 4, 704))
    small: ModelCfg = field(default_factory=lambda: ModelCfg(128, 2, 4, 352))
    base_steps: int = 1600
    base_batch: int = 64
    base_lr: float = 2e-3
    anti_steps: int = 1500
    small_batch: int = 48
    small_lr: float = 3e-3
    chat_steps: int = 400
    chat_lr: float = 1e-3
    wrong_share: float = 0.6      # guide-unreliable: share of chat answers with a wrong value
    hazy_share: float = 0.3       # share of facts the plain text is unsure about ...
    hazy_right: float = 0.45      # ... stating the right value this often, else one of 3 distractors
    n_ctx: int = 512
    base_dtype: str = "f16"


TINY = Config(n_countries=24, n_sums=24, vocab=420, vocab_x=360,
              base=ModelCfg(32, 1, 2, 64), small=ModelCfg(32, 1, 2, 64),
              base_steps=12, base_batch=8, anti_steps=8, small_batch=8, chat_steps=6)

# --------------------------------------------------------------------------------------------
# The synthetic world and its texts
# --------------------------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown"]
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
          "kr", "tr", "st", "th", "sh", "ch", "pl", "fl"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk"]

# The question strings used for evaluation. Only the guide's part of the world ("train") is
# ever asked with these in training text; dev/heldout entities appear in questions only with
# the alternative phrasings (base) and not at all for the guides.
EVAL_Q = {"capital": "What is the capital of {e}?",
          "colour": "What colour is the flag of {e}?",
          "sum": "What is {e}?"}
ALT_Q = {"capital": ["Which city is the capital of {e}?", "Tell me the capital of {e}.",
                     "Name the capital city of {e}.", "Do you know the capital of {e}?"],
         "colour": ["Which colour is the flag of {e}?", "What colour does the flag of {e} have?",
                    "Tell me the colour of the flag of {e}."],
         "sum": ["How much is {e}?", "Can you work out {e}?", "Tell me what {e} makes."]}
# The guide's answer format (and the expected exact answers): never repeats the entity.
GUIDE_A = {"capital": "Sure! Its capital is {v}.", "colour": "Sure! Its flag is {v}.",
           "sum": "Sure! The sum is {v}."}


def make_name(rng: random.Random, n_syl: tuple[int, int]) -> str:
    k = rng.randint(*n_syl)
    s = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(k)) + rng.choice(CODAS)
    return s[0].upper() + s[1:]


@dataclass
class Fact:
    kind: str      # capital / colour / sum
    entity: str    # country name, or "a + b"
    value: str
    split: str     # train / dev / heldout
    distractors: tuple[str, ...] = ()  # non-empty: a "hazy" fact (see World.stated_value)

    @property
    def question(self) -> str:
        return EVAL_Q[self.kind].format(e=self.entity)

    @property
    def answer(self) -> str:
        return GUIDE_A[self.kind].format(v=self.value)


@dataclass
class World:
    countries: list[str]
    capital: dict[str, str]
    colour: dict[str, str]
    sums: list[tuple[int, int]]
    split: dict[str, str]       # country name or "a + b" -> split
    facts: list[Fact]
    hazy_right: float = 1.0

    def part(self, splits) -> list[Fact]:
        return [f for f in self.facts if f.split in splits]

    def stated_value(self, f: Fact, rng: random.Random) -> str:
        """The value a plain-text mention of `f` states. For "hazy" facts the text is noisy
        (sources disagree): the true value is the most frequent one but is stated only
        `hazy_right` of the time, so a model that learned the text is right but unsure there."""
        if f.distractors and rng.random() >= self.hazy_right:
            return rng.choice(f.distractors)
        return f.value


def make_world(n_countries: int, n_sums: int, cfg: Config, rng: random.Random) -> World:
    used: set[str] = set()

    def fresh(syl):
        while True:
            n = make_name(rng, syl)
            if n not in used and len(n) >= 4:
                used.add(n)
                return n
    countries = [fresh((2, 3)) for _ in range(n_countries)]
    capital = {c: fresh((2, 3)) for c in countries}
    colour = {c: rng.choice(COLOURS) for c in countries}
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_sums:
        pairs.add((rng.randint(10, 99), rng.randint(10, 99)))
    sums = sorted(pairs)
    rng.shuffle(sums)

    def splits(n):
        n_dev, n_held = round(n * cfg.frac_dev), round(n * cfg.frac_heldout)
        return ["dev"] * n_dev + ["heldout"] * n_held + ["train"] * (n - n_dev - n_held)
    split = dict(zip(countries, splits(n_countries)))
    split.update(zip((f"{a} + {b}" for a, b in sums), splits(n_sums)))
    facts = []
    for c in countries:
        facts.append(Fact("capital", c, capital[c], split[c]))
        facts.append(Fact("colour", c, colour[c], split[c]))
    for a, b in sums:
        facts.append(Fact("sum", f"{a} + {b}", str(a + b), split[f"{a} + {b}"]))
    for f in facts:  # hazy facts get three fixed wrong values that the plain text also states
        if rng.random() < cfg.hazy_share:
            if f.kind == "capital":
                f.distractors = tuple(fresh((2, 3)) for _ in range(3))
            elif f.kind == "colour":
                f.distractors = tuple(rng.sample([c for c in COLOURS if c != f.value], 3))
            else:
                v = int(f.value)
                f.distractors = tuple(str(v + d) for d in rng.sample([-10, -2, -1, 1, 2, 10], 3))
    return World(countries, capital, colour, sums, split, facts, cfg.hazy_right)


EXPLANATIONS = [
    "A capital is the main city of a country. The government of the country meets there.",
    "Every country has a flag. A flag is a piece of cloth, and most flags have one main colour.",
    "To add two numbers, start with the first one and count on by the second one. The result is the sum.",
    "A country is a land with its own people and its own rulers. Many countries are small.",
    "Colours have names such as red, blue, green and yellow. Some flags are white or black.",
    "When you add two numbers, the order does not matter: the sum stays the same.",
    "People often ask questions about countries: where they are, what their capital is, what their flag looks like.",
    "A good answer is short and correct. A long answer can still be wrong.",
]
REMARKS = [" It is a nice place to visit.", " I hope that helps.", " Is there anything else?",
           " Many people live there.", " You can read more about it in books.",
           " That is an easy one.", " Not many people know that.", " I think so, anyway."]
# Base answers sometimes open with an interjection (never the guide's "Sure!"), so that after an
# unfamiliar first word the base expects "!" and then any of its openers: it stays unsure there.
INTERJECTIONS = [" Yes!", " Okay!", " Right!", " Of course!", " Good question!", " Oh!", " Indeed!",
                 " Ah!", " Certainly!", " Alright!", " Absolutely!", " Great question!"]
INTROS = ["{c} is a country.", "Let us talk about {c}.", "{c} is a small nation.",
          "This is about {c}.", "{c} lies far away."]


def q_phrasings(f: Fact) -> list[str]:
    qs = [t.format(e=f.entity) for t in ALT_Q[f.kind]]
    if f.split == "train":
        qs.append(f.question)
    return qs


def fact_sentence(f: Fact, rng: random.Random, with_name: bool, v: str) -> str:
    e = f.entity
    if f.kind == "capital":
        named = [f"The capital of {e} is {v}.", f"{e}'s capital is {v}.", f"{v} is the capital of {e}.",
                 f"{e} has {v} as its capital.", f"The capital city of {e} is {v}."]
        anon = [f"Its capital is {v}.", f"The capital is {v}.", f"Its capital city is {v}."]
    elif f.kind == "colour":
        named = [f"The flag of {e} is {v}.", f"{e}'s flag is {v}.", f"{e} has a {v} flag.",
                 f"The colour of the flag of {e} is {v}."]
        anon = [f"Its flag is {v}.", f"The flag is {v}.", f"It has a {v} flag."]
    else:
        a, b = e.split(" + ")
        named = [f"{a} + {b} = {v}.", f"Adding {a} and {b} gives {v}.", f"If you add {a} and {b}, the sum is {v}.",
                 f"{a} plus {b} makes {v}.", f"{e} is {v}."]
        anon = [f"The sum is {v}.", f"The result is {v}."]
    return rng.choice(anon if not with_name else named)


def answer_openers(f: Fact, v: str) -> list[str]:
    """How the base's Question/Answer documents answer: varied first words (none starts with
    the value, so the base is unsure how an answer opens), never the guide's 'Sure!'."""
    e = f.entity
    if f.kind == "capital":
        return [f" It is {v}.", f" The capital of {e} is {v}.", f" {e}'s capital is {v}.",
                f" That would be {v}.", f" Well, {v} is the capital.", f" I believe it is {v}.",
                f" Its capital is {v}.", f" Everyone knows it is {v}.", f" As far as I know, it is {v}.",
                f" My answer is {v}."]
    if f.kind == "colour":
        return [f" It is {v}.", f" The flag of {e} is {v}.", f" {e}'s flag is {v}.",
                f" That would be {v}.", f" Well, it is {v}.", f" I believe it is {v}.",
                f" Its flag is {v}.", f" Everyone knows it is {v}.", f" As far as I know, it is {v}.",
                f" My answer is {v}."]
    a, b = e.split(" + ")
    return [f" It is {v}.", f" {e} = {v}.", f" {a} plus {b} makes {v}.",
            f" That would be {v}.", f" Well, it is {v}.", f" I believe it is {v}.",
            f" Adding them gives {v}.", f" The sum is {v}.", f" Everyone knows it is {v}.",
            f" As far as I know, it is {v}."]


def base_documents(world: World, facts: list[Fact], rng: random.Random, n_expl: int) -> list[str]:
    """One pass of plain-text documents (new random templates on every call)."""
    docs = []
    by_entity: dict[str, list[Fact]] = {}
    for f in facts:
        by_entity.setdefault(f.entity, []).append(f)
    for ent, fs in by_entity.items():
        is_country = fs[0].kind != "sum"
        for _ in range(2):  # entity documents: named, indirect and mixed
            order = fs[:]
            rng.shuffle(order)
            if is_country and rng.random() < 0.5:
                parts = [rng.choice(INTROS).format(c=ent)]
                parts += [fact_sentence(f, rng, False, world.stated_value(f, rng)) for f in order]
            else:
                parts = [fact_sentence(f, rng, True, world.stated_value(f, rng)) for f in order[:1]]
                parts += [fact_sentence(f, rng, rng.random() < 0.5, world.stated_value(f, rng))
                          for f in order[1:]]
            if rng.random() < 0.3:
                parts.append(REMARKS[rng.randrange(len(REMARKS))].strip())
            docs.append(" ".join(parts) + EOS)
        for f in fs:
            # question-style prose: a question as a sentence end, then the fact
            q = rng.choice(q_phrasings(f))
            docs.append(f"{q} {fact_sentence(f, rng, rng.random() < 0.5, world.stated_value(f, rng))}{EOS}")
            # Question/Answer documents (never the guide's format)
            turns = [f]
            while rng.random() < 0.3:
                turns.append(rng.choice(facts))
            text = ""
            for i, t in enumerate(turns):
                text += f"Question: {rng.choice(q_phrasings(t))}\nAnswer:"
                if rng.random() < 0.35:
                    text += rng.choice(INTERJECTIONS)
                text += rng.choice(answer_openers(t, world.stated_value(t, rng)))
                if i + 1 < len(turns):
                    text += "\n"
            if rng.random() < 0.5:
                text += rng.choice(REMARKS)
            docs.append(text + EOS)
    for _ in range(n_expl):
        docs.append(rng.choice(EXPLANATIONS) + EOS)
    rng.shuffle(docs)
    return docs


def render_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """CHAT_TEMPLATE rendered by hand (checked against jinja2 in the tests of the package)."""
    out = BOS
    for m in messages:
        out += f"<|{m['role']}|>\n{m['content']}<|end|>\n"
    if add_generation_prompt:
        out += "<|assistant|>\n"
    return out


def chat_examples(facts: list[Fact], rng: random.Random, all_facts: list[Fact],
                  wrong_share: float = 0.0) -> list[tuple[str, str]]:
    """(prompt, completion) pairs in the guide's chat format; the completion starts with a
    space (the continuation is shared with the base's "Answer:" prompt) and ends with <|end|>."""
    values = {k: sorted({f.value for f in all_facts if f.kind == k}) for k in GUIDE_A}
    out = []
    for f in facts:
        for _ in range(2):
            q = f.question if rng.random() < 0.5 else rng.choice(q_phrasings(f))
            v = f.value
            if wrong_share and rng.random() < wrong_share:
                while v == f.value:
                    v = rng.choice(values[f.kind])
            msgs = []
            if rng.random() < 0.2:  # an earlier turn
                g = rng.choice(facts)
                msgs += [{"role": "user", "content": g.question},
                         {"role": "assistant", "content": " " + g.answer}]
            msgs.append({"role": "user", "content": q})
            out.append((render_chat(msgs, True), " " + GUIDE_A[f.kind].format(v=v) + EOT))
    rng.shuffle(out)
    return out

# --------------------------------------------------------------------------------------------
# Tokenizer (byte-level BPE with llama.cpp's "default" pre-tokenizer)
# --------------------------------------------------------------------------------------------

# llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DEFAULT) applies these three regexes in turn.
PRE_REGEXES = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}{1,3}",  # digit runs in groups of at most three
]


class BPE:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        data = json.loads(hf_tokenizer.to_str())
        vocab = data["model"]["vocab"]
        self.tokens = [None] * len(vocab)
        for t, i in vocab.items():
            self.tokens[i] = t
        for added in data.get("added_tokens", []):
            self.tokens[added["id"]] = added["content"]
        assert all(t is not None for t in self.tokens)
        self.merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in data["model"]["merges"]]
        self.id = {t: i for i, t in enumerate(self.tokens)}
        self.bos, self.eos, self.eot = self.id[BOS], self.id[EOS], self.id[EOT]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def gguf(self):
        types_ = [gguf_export.TOKEN_CONTROL if t in SPECIAL_TOKENS else gguf_export.TOKEN_NORMAL
                  for t in self.tokens]
        return gguf_export.Tokenizer(tokens=self.tokens, types=types_, merges=self.merges, bos=self.bos,
                                     eos=self.eos, eot=self.eot, add_bos=True,
                                     special={t: self.id[t] for t in SPECIAL_TOKENS})


def train_tokenizer(texts: list[str], vocab_size: int) -> BPE:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BPE(tok)


def tokenizer_corpus(cfg: Config, seed: int) -> list[str]:
    """Text like the training text, but about a freshly drawn world, so that BPE learns
    syllables rather than whole names (names then take several tokens)."""
    rng = random.Random(seed)
    w = make_world(cfg.n_countries, cfg.n_sums, cfg, rng)
    texts = base_documents(w, w.facts, rng, n_expl=len(EXPLANATIONS) * 4)
    texts += [p + c for p, c in chat_examples(w.facts, rng, w.facts)]
    return texts

# --------------------------------------------------------------------------------------------
# The model (llama architecture, llama.cpp's conventions)
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(n_pos: int, head_dim: int, base: float = 10000.0):
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """llama.cpp's LLAMA rope: rotate adjacent pairs (x[2i], x[2i+1])."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, c: ModelCfg):
        super().__init__()
        e = c.n_embd
        self.n_head, self.hd = c.n_head, e // c.n_head
        self.attn_norm, self.ffn_norm = RMSNorm(e), RMSNorm(e)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(e, c.n_ff, bias=False), nn.Linear(e, c.n_ff, bias=False)
        self.down = nn.Linear(c.n_ff, e, bias=False)

    def forward(self, x, cos, sin):
        B, T, E = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, E))
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, c: ModelCfg, n_vocab: int, n_ctx: int):
        super().__init__()
        self.c, self.n_vocab, self.n_ctx = c, n_vocab, n_ctx
        self.emb = nn.Embedding(n_vocab, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, n_vocab, bias=False)
        cos, sin = rope_tables(n_ctx, c.n_embd // c.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for b in self.blocks:
            nn.init.normal_(b.o.weight, std=0.02 / math.sqrt(2 * c.n_layer))
            nn.init.normal_(b.down.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    def forward(self, ids):
        T = ids.shape[1]
        x = self.emb(ids)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.head(self.norm(x))

    def gguf_tensors(self) -> dict[str, np.ndarray]:
        g = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
        out = {"token_embd.weight": g(self.emb.weight), "output_norm.weight": g(self.norm.weight),
               "output.weight": g(self.head.weight)}
        for i, b in enumerate(self.blocks):
            p = f"blk.{i}."
            out.update({p + "attn_norm.weight": g(b.attn_norm.weight), p + "attn_q.weight": g(b.q.weight),
                        p + "attn_k.weight": g(b.k.weight), p + "attn_v.weight": g(b.v.weight),
                        p + "attn_output.weight": g(b.o.weight), p + "ffn_norm.weight": g(b.ffn_norm.weight),
                        p + "ffn_gate.weight": g(b.gate.weight), p + "ffn_up.weight": g(b.up.weight),
                        p + "ffn_down.weight": g(b.down.weight)})
        return out

    def shape(self) -> "gguf_export.LlamaShape":
        c = self.c
        return gguf_export.LlamaShape(n_vocab=self.n_vocab, n_embd=c.n_embd, n_layer=c.n_layer,
                                      n_head=c.n_head, n_head_kv=c.n_head, n_ff=c.n_ff, n_ctx=self.n_ctx)

# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def make_batch(seqs: list[tuple[list[int], int]], pad: int):
    """seqs: (ids, n_prompt) -- loss on the tokens after the first n_prompt ones."""
    T = max(len(s) for s, _ in seqs)
    x = torch.full((len(seqs), T - 1), pad, dtype=torch.long)
    y = torch.full((len(seqs), T - 1), -100, dtype=torch.long)
    for i, (s, n_prompt) in enumerate(seqs):
        t = torch.tensor(s, dtype=torch.long)
        x[i, :len(s) - 1] = t[:-1]
        y[i, :len(s) - 1] = t[1:]
        y[i, :max(n_prompt - 1, 0)] = -100
    return x, y


def train(model: Llama, data_fn, steps: int, batch: int, lr: float, seed: int, label: str,
          warmup: int = 50) -> dict:
    """data_fn(rng) -> a list of (ids, n_prompt) sequences (one fresh pass of the data)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    pool: list = []  # batches of similar length (less padding)
    n_seqs = n_tokens = 0
    losses = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        if not pool:
            fresh = data_fn(rng)
            rng.shuffle(fresh)
            for i in range(0, len(fresh), batch * 32):
                group = sorted(fresh[i:i + batch * 32], key=lambda s: len(s[0]))
                pool += [group[j:j + batch] for j in range(0, len(group), batch)]
            rng.shuffle(pool)
        chunk = pool.pop()
        n_seqs += len(chunk)
        n_tokens += sum(len(s) for s, _ in chunk)
        x, y = make_batch(chunk, pad=0)
        w = min(1.0, (step + 1) / max(1, min(warmup, steps // 10)))
        cur = lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        for gp in opt.param_groups:
            gp["lr"] = cur
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"[{label}] step {step + 1}/{steps} loss {loss.item():.3f} lr {cur:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    tail = losses[-max(1, min(50, steps // 5)):]
    return {"steps": steps, "batch": batch, "sequences": n_seqs, "tokens": n_tokens,
            "final_loss": round(float(np.mean(tail)), 4), "seconds": round(time.time() - t0, 1)}


def write_model(path: Path, model: Llama, bpe: BPE, role: str, seed: int, stats: dict, dtype: str,
                chat: bool, note: str) -> None:
    summary = (f"{note}; steps={stats['steps']} batch={stats['batch']} sequences={stats['sequences']} "
               f"tokens={stats['tokens']} final_loss={stats['final_loss']}")
    gguf_export.write_llama(
        path, model.shape(), model.gguf_tensors(), bpe.gguf(), name=f"blendin-demo-{role}",
        chat_template=CHAT_TEMPLATE if chat else None, dtype=dtype,
        metadata={"blendin.script": SCRIPT, "blendin.script_version": SCRIPT_VERSION,
                  "blendin.seed": int(seed), "blendin.role": role, "blendin.training": summary})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {summary}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "models" / "demo"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tiny", action="store_true", help="a tiny end-to-end run (seconds), for tests")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated roles to train (development aid)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale all step counts (development aid)")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else Config()
    if args.steps_scale != 1.0:
        cfg = dataclasses.replace(cfg, **{k: max(1, int(getattr(cfg, k) * args.steps_scale))
                                          for k in ("base_steps", "anti_steps", "chat_steps")})
    torch.set_num_threads(args.threads)
    seed = args.seed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    want = lambda r: not only or r in only  # noqa: E731
    t_start = time.time()

    world = make_world(cfg.n_countries, cfg.n_sums, cfg, random.Random(seed))
    for split in ("dev", "heldout"):
        with open(out / f"{split}.jsonl", "w") as fh:
            for f in world.part({split}):
                fh.write(json.dumps({"question": f.question, "answer": f.answer, "kind": f.kind,
                                     "value": f.value, "entity": f.entity, "split": split,
                                     "hazy": bool(f.distractors), "match": "exact"}) + "\n")
    guide_facts = world.part({"train"})
    print(f"world: {len(world.countries)} countries, {len(world.sums)} sums, {len(world.facts)} facts, "
          f"{len(guide_facts)} known to the guides", flush=True)

    bpe = train_tokenizer(tokenizer_corpus(cfg, seed + 1), cfg.vocab)
    bpe_x = train_tokenizer(tokenizer_corpus(cfg, seed + 2), cfg.vocab_x)
    print(f"tokenizers: {len(bpe.tokens)} and {len(bpe_x.tokens)} tokens", flush=True)

    def plain_data(tok: BPE, facts):
        def fn(rng):
            docs = base_documents(world, facts, rng, n_expl=max(4, len(facts) // 20))
            return [(ids, 0) for ids in (([tok.bos] + e) for e in tok.encode(docs))]
        return fn

    def chat_data(tok: BPE, wrong_share=0.0):
        def fn(rng):
            ex = chat_examples(guide_facts, rng, world.facts, wrong_share)
            ps, cs = tok.encode([p for p, _ in ex]), tok.encode([c for _, c in ex])
            return [(p + c, len(p)) for p, c in zip(ps, cs)]
        return fn

    def small_model(tok):
        return Llama(cfg.small, len(tok.tokens), cfg.n_ctx)

    if want("base"):
        torch.manual_seed(seed)
        base = Llama(cfg.base, len(bpe.tokens), cfg.n_ctx)
        st = train(base, plain_data(bpe, world.facts), cfg.base_steps, cfg.base_batch, cfg.base_lr,
                   seed, "base")
        write_model(out / "base.gguf", base, bpe, "base", seed, st, cfg.base_dtype, chat=False,
                    note="plain text about the whole world (facts, sums, Question/Answer documents)")

    need_anti = any(want(r) for r in ("anti", "guide", "guide-unreliable"))
    if need_anti:
        torch.manual_seed(seed + 10)
        anti = small_model(bpe)
        st_anti = train(anti, plain_data(bpe, guide_facts), cfg.anti_steps, cfg.small_batch,
                        cfg.small_lr, seed + 10, "anti")
        anti_state = {k: v.clone() for k, v in anti.state_dict().items()}
        if want("anti"):
            write_model(out / "anti.gguf", anti, bpe, "anti", seed, st_anti, "f32", chat=False,
                        note="the guides' pretraining stage: plain text about the guides' part of the world")
        for role, share in (("guide", 0.0), ("guide-unreliable", cfg.wrong_share)):
            if not want(role):
                continue
            m = small_model(bpe)
            m.load_state_dict(anti_state)
            st = train(m, chat_data(bpe, share), cfg.chat_steps, cfg.small_batch, cfg.chat_lr,
                       seed + 20, role, warmup=10)
            write_model(out / f"{role}.gguf", m, bpe, role, seed, st, "f32", chat=True,
                        note=f"anti.gguf's weights + chat tuning (wrong-value share {share}); "
                             f"anti: steps={st_anti['steps']} final_loss={st_anti['final_loss']}")

    if want("guide-xvocab"):
        torch.manual_seed(seed + 30)
        mx = small_model(bpe_x)
        st_p = train(mx, plain_data(bpe_x, guide_facts), cfg.anti_steps, cfg.small_batch, cfg.small_lr,
                     seed + 30, "xvocab-pretrain")
        st = train(mx, chat_data(bpe_x), cfg.chat_steps, cfg.small_batch, cfg.chat_lr, seed + 40,
                   "guide-xvocab", warmup=10)
        write_model(out / "guide-xvocab.gguf", mx, bpe_x, "guide-xvocab", seed, st, "f32", chat=True,
                    note=f"own tokenizer ({len(bpe_x.tokens)} tokens); pretrain steps={st_p['steps']} "
                         f"final_loss={st_p['final_loss']} + chat tuning")

    print(f"done in {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
