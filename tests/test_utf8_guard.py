"""Samples never break: the UTF-8 guard masks the tokens whose bytes cannot continue the pending ones, so every
sample of every tokenizer decodes exactly, streamed or not, with the KV cache's tokens those of recomputing."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bookgpt import tokenizer as T
from bookgpt.sampling import stream_text, utf8_guard, utf8_state, utf8_table
from model import GPT, GPTConfig, next_token_probs


AFTER = utf8_table(T.ByteTokenizer(), 256)[0].tolist()  # the byte tokenizer's table: one byte a token


def complete(data: bytes) -> int:
    """The strict automaton's state after `data` (no resynchronising): -1 once it is not valid UTF-8."""
    state = 0
    for byte in data:
        state = AFTER[state][byte] if state >= 0 else -1
    return state


def test_the_automaton_is_utf8() -> None:
    """Complete and valid exactly when Python's strict decoder agrees; a valid prefix exactly when some
    continuation makes it whole (every 1- and 2-byte string, and 3- and 4-byte strings around the edges)."""
    edges = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED,
             0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    cases = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    cases += [bytes([a, b, c]) for a in edges for b in edges for c in edges]
    cases += [bytes([a, b, c, d]) for a in edges[-8:] for b in edges for c in edges[2:8] for d in edges[2:8]]
    continuations = [bytes([b]) for b in range(256)]
    continuations += [a + b for a in continuations[0x80:0xC0:13] for b in continuations[0x80:0xC0:13]]
    continuations += [a + b for a in continuations[0x80:0xC0:21] for b in continuations[256:]]
    for data in cases:
        try:
            data.decode("utf-8")
            whole = True
        except UnicodeDecodeError:
            whole = False
        state = complete(data)
        assert (state == 0) == whole, data
        if state > 0:  # a valid prefix: some continuation completes it, and the automaton knows which
            for more in continuations:
                assert (complete(data + more) == 0) == _decodes(data + more), data + more
        elif state < 0:
            assert not any(_decodes(data + more) for more in continuations[::9]), data


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_prompt_cut_inside_a_character_is_resynchronised() -> None:
    assert utf8_state("é".encode()[:1]) == 1 and utf8_state("€".encode()[:2]) == 1
    assert utf8_state("€".encode()[1:]) == 0  # starts inside a character: its tail is skipped
    assert utf8_state("𝄞".encode()[:1]) == 6 and utf8_state(b"abc\xff") == 0


def test_the_masked_distribution_is_renormalised() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    allowed = torch.rand(3, 50) < 0.4
    allowed[:, 0] = True
    for top_k, top_p in ((None, None), (10, None), (None, 0.7)):
        probs = next_token_probs(logits, 0.8, top_k, top_p, allowed)
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
        assert (probs[~allowed] == 0).all()
    plain = torch.softmax(logits / 0.8, dim=-1)
    kept = plain * allowed
    torch.testing.assert_close(next_token_probs(logits, 0.8, None, None, allowed), kept / kept.sum(-1, keepdim=True))


@pytest.fixture(scope="module")
def tokenizers(book_text: str, gpt2_dir: Path) -> dict[str, T.Tokenizer]:
    return {"byte": T.ByteTokenizer(), "bpe": T.train_bpe(book_text[:200_000], 400),
            "gpt2": T.load_gpt2(gpt2_dir), "char": T.CharTokenizer.from_text(book_text)}


def breaking_model(tok: T.Tokenizer, vocab_size: int) -> GPT:
    """A tiny model pushed toward broken UTF-8: the tokens that are a lone continuation byte, a byte that never
    starts a character, or a lead byte get most of the probability."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0)).eval()
    push = torch.zeros(vocab_size)
    for i in range(tok.vocab_size):
        data = tok.decode_bytes([i])
        if data[0] >= 0x80 or data[-1] >= 0xC0:
            push[i] = 6.0
    forward = model.forward
    model.forward = lambda idx, targets=None, cache=None: (forward(idx, cache=cache)[0] + push, None)
    return model


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2", "char"])
def test_no_sample_ever_breaks(tokenizers: dict[str, T.Tokenizer], kind: str) -> None:
    tok = tokenizers[kind]
    vocab = tok.vocab_size + 16 if kind == "gpt2" else tok.vocab_size  # a model's table padded past the vocabulary
    model = breaking_model(tok, vocab)
    prompt = torch.tensor([tok.encode("Natásha said")])
    if kind == "char":  # every token is whole characters: nothing to guard
        assert utf8_guard(tok, vocab) is None
        return
    unguarded = model.generate(prompt, 60, 1.0, generator=torch.Generator().manual_seed(0))
    assert "\ufffd" in tok.decode(unguarded[0, prompt.size(1):].tolist())  # the push does break samples
    for seed in range(3):
        for n in (1, 2, 3, 60):  # short samples must still end on a whole character
            rows = {}
            for cache in (True, False):
                out = model.generate(prompt, n, 1.0, generator=torch.Generator().manual_seed(seed), use_cache=cache,
                                     allowed=utf8_guard(tok, vocab))
                rows[cache] = out[0, prompt.size(1):].tolist()
                tok.decode_bytes(rows[cache]).decode("utf-8")  # strict: raises on a broken character
            assert rows[True] == rows[False]
    # greedy, batched, from a prompt that ends inside a character (evaluate.py cuts prompts by tokens)
    lead = next(i for i in range(tok.vocab_size) if tok.decode_bytes([i]) == "é".encode()[:1])
    ids = torch.cat([prompt, torch.tensor([[lead]])], dim=1).repeat(2, 1)
    out = model.generate(ids, 20, 0.0, allowed=utf8_guard(tok, vocab))
    for row in out.tolist():
        tok.decode_bytes(row).decode("utf-8")
    # streamed as sample.py and the page do: no replacement character, the same text as decoding at once
    pieces = list(stream_text(model, tok, "Natásha said", max_new_tokens=40, temperature=1.0, seed=5))
    assert "\ufffd" not in "".join(pieces)
    ids = model.generate(prompt, 40, 1.0, generator=torch.Generator().manual_seed(5), allowed=utf8_guard(tok, vocab))
    assert "".join(pieces) == tok.decode(ids[0, prompt.size(1):].tolist())


def test_random_pushes_never_break_a_bpe_sample(tokenizers: dict[str, T.Tokenizer]) -> None:
    tok = tokenizers["bpe"]
    model = breaking_model(tok, tok.vocab_size)
    rng = random.Random(0)
    for trial in range(20):
        prompt = torch.tensor([[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 10))]])
        out = model.generate(prompt, rng.randrange(1, 30), rng.choice([0.5, 1.0, 2.0]),
                             generator=torch.Generator().manual_seed(trial), allowed=utf8_guard(tok, tok.vocab_size))
        state = utf8_state(tok.decode_bytes(prompt[0].tolist()))
        after = utf8_table(tok, tok.vocab_size)[0]
        for t in out[0, prompt.size(1):].tolist():
            state = int(after[state, t])
            assert state >= 0
        assert state == 0
