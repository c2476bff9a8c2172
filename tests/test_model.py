"""model.py and bookgpt/kernels.py: shapes, the loss at init, KV-cache equivalence, architecture options,
accounting, the CPU kernels and their switch, and a checkpoint saved before the kernels moved."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bookgpt.kernels import Linear, dropout, explicit_causal_attention
from model import GPT, GPTConfig, apply_rope, rope_tables, sample_next

GPT2 = dict(pos_emb="learned", norm="layernorm", qk_norm=False, mlp="gelu")  # GPT-2's block
VARIANTS = {
    "gpt2": GPT2,
    "default": {},  # the recipe's: rotary, RMSNorm, QK-norm, squared ReLU
    "modern": dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", tie_weights=False, logit_softcap=15.0),
    "relu2": dict(mlp="relu2", bias=True, qk_norm=False),
    "levers": dict(value_embeds=1, unet_skips=True),  # the speedrun's levers; zero_init below
    "gpt2_levers": dict(**GPT2, value_embeds=1, unet_skips=True),  # its cache stores the values as computed
    "attn_gate": dict(attn_gate=True),
    "mtp": dict(mtp_weight=0.5),  # in eval mode (as here) the model is the one without its extra block
    "loop": dict(n_layer=3, loop_blocks=1, value_embeds=1, unet_skips=True),  # block 1 runs twice: 0 1 1 2
}


def tiny(cpu_kernels: bool = True, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw}), cpu_kernels=cpu_kernels).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_loss_at_init_is_ln_vocab(variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    idx, targets = torch.randint(0, 37, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 37)
    # small init: predictions are near uniform, so the loss on random targets is near ln(vocab)
    # (targets = inputs would not do: a tied head slightly favours repeating the input token)
    assert abs(loss.item() - math.log(37)) < 0.15
    assert model(idx)[1] is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_generates_the_same_tokens_as_recomputing(variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    prompt = torch.randint(0, 37, (2, 5))
    # 60 new tokens with block_size 16: the context window jumps several times
    kw = dict(max_new_tokens=60, temperature=1.0, top_k=20, top_p=0.9)
    cached = model.generate(prompt, **kw, generator=torch.Generator().manual_seed(3))
    plain = model.generate(prompt, **kw, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert cached.shape == (2, 65)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :5], prompt)


def test_cached_logits_match_full_forward() -> None:
    model = tiny(pos_emb="rope")
    seq = torch.randint(0, 37, (1, 12))
    full, _ = model(seq)
    cache = model.new_cache(1, seq.device, torch.float32)
    first, _ = model(seq[:, :7], cache=cache)
    steps = [model(seq[:, i:i + 1], cache=cache)[0] for i in range(7, 12)]
    stepped = torch.cat([first] + steps, dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_kv_cache_is_kept_in_the_dtype_attention_computes_in(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 cache under bf16 autocast is cast whole, every sampled token, to meet the bf16 queries."""
    model = tiny(**VARIANTS[variant])
    caches = []
    real = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **kw: caches.append(real(*a, **kw)) or caches[-1])
    prompt = torch.randint(0, 37, (1, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 25) and caches and all(kv.dtype == torch.bfloat16 for c in caches for kv in c.kv)
    model.generate(prompt, 2)
    assert all(kv.dtype == torch.float32 for kv in caches[-1].kv)  # no autocast: the weights' dtype


def test_sampling_layout_gives_the_same_products_and_is_dropped_after() -> None:
    model = tiny(bias=True)
    seq = torch.randint(0, 37, (2, 9))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m, Linear) for m in linears)  # every matrix gets the sampling layout
    with torch.no_grad():
        plain, _ = model(seq)
        with model.sampling_weights():
            assert all(m.weight_t is not None and m.weight_t.shape == m.weight.T.shape for m in linears)
            laid_out, _ = model(seq)
            with torch.autocast("cpu", torch.bfloat16):
                low, _ = model(seq)
            lin = model.blocks[0].mlp.c_fc
            lin.weight.add_(1.0)  # a changed weight: its stale copy must not be used
            x = torch.randn(3, 32)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    torch.testing.assert_close(laid_out, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.float(), plain, rtol=0.05, atol=0.05)
    assert all(m.weight_t is None for m in linears)
    # under autocast the copies are made in its dtype, so no step casts the weights again
    with torch.autocast("cpu", torch.bfloat16), model.sampling_weights():
        assert {m.weight_t.dtype for m in linears} == {torch.bfloat16}
    # a generation abandoned part-way drops the copies too
    stream = model.generate_stream(seq, 10, generator=torch.Generator().manual_seed(0))
    next(stream)
    assert linears[0].weight_t is not None
    stream.close()
    assert all(m.weight_t is None for m in linears)


def test_prompt_longer_than_block_is_cropped() -> None:
    model = tiny()
    prompt = torch.randint(0, 37, (1, 40))
    out = model.generate(prompt, 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 45)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_sampling_controls() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert sample_next(logits, temperature=0).item() == 1  # greedy
    draws = {sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 3}  # top-k keeps the two best
    # top_p: token 1 alone holds < 0.6 of the mass, tokens {1, 3} hold more: only those can be drawn
    draws = {sample_next(logits, 1.0, top_p=0.6, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 3}


def test_weight_tying_and_param_counts() -> None:
    tied, untied = tiny(**GPT2), tiny(tie_weights=False, **GPT2)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    emb = 37 * 32
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == emb
    # non-embedding count drops the position table (and the input table when it is not the head)
    assert tied.num_params(non_embedding=False) - tied.num_params() == 16 * 32
    assert untied.num_params(non_embedding=False) - untied.num_params() == 16 * 32 + emb


def test_flops_per_token_hand_count() -> None:
    model = tiny()  # L=2, C=32, T=16, V=37, 4x MLP, no biases
    C, L, T, V = 32, 2, 16, 37
    per_layer = 3 * C * C + C * C + 4 * C * C + 4 * C * C  # qkv, proj, fc, mlp proj
    matmul = L * per_layer + V * C  # + output head
    assert model.flops_per_token() == 6 * matmul + 12 * L * C * T
    assert model.estimate_mfu(tokens_per_s=1000, peak_flops=model.flops_per_token() * 1000) == pytest.approx(1.0)


def test_swiglu_keeps_the_parameter_count_close() -> None:
    gelu, swiglu = tiny(), tiny(mlp="swiglu")
    assert abs(swiglu.num_params() - gelu.num_params()) / gelu.num_params() < 0.05


def test_rope_preserves_norms_and_depends_on_relative_position() -> None:
    torch.manual_seed(0)
    hd = 8
    cos, sin = rope_tables(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(x.view(1, 1, 1, hd), cos[pos:pos + 1], sin[pos:pos + 1]).view(hd)

    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    # the score of q at m and k at n depends only on m - n
    torch.testing.assert_close(at(q, 9) @ at(k, 4), at(q, 30) @ at(k, 25), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(at(q, 9) @ at(k, 4), at(q, 9) @ at(k, 5))


def test_logit_softcap_bounds_logits() -> None:
    model = tiny(logit_softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits, _ = model(torch.randint(0, 37, (1, 8)))
    assert logits.abs().max() <= 2.0


def test_qk_norm_normalises_heads() -> None:
    model = tiny(qk_norm=True, norm="rmsnorm")
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, attn.head_dim) * 10
    rms = attn.q_norm(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)


def test_bad_config_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(mlp="tanh")
    with pytest.raises(ValueError, match=r"value_embeds must be 0..n_layer // 2 = 3"):
        GPTConfig(n_layer=6, value_embeds=4)
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
        GPTConfig(drop_path=1.0)


def test_value_embeddings_and_skips_start_from_the_plain_model_and_learn() -> None:
    """With its value tables and skip weights at zero, a model with the levers computes what the model
    without them does with the same other weights; trained, both kinds of weight get gradients."""
    plain, levers = tiny(n_layer=4), tiny(n_layer=4, value_embeds=2, unet_skips=True)
    assert len(levers.value_embeds) == 2 and levers.skip_weights.shape == (2,)
    extra = {n for n, _ in levers.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra == {"value_embeds.0.weight", "value_embeds.1.weight", "skip_weights"}
    levers.load_state_dict(plain.state_dict(), strict=False)
    idx = torch.randint(0, 37, (2, 16))
    assert not torch.allclose(levers(idx)[0], plain(idx)[0])
    with torch.no_grad():
        levers.skip_weights.zero_()
        for table in levers.value_embeds:
            table.weight.zero_()
    torch.testing.assert_close(levers(idx)[0], plain(idx)[0])
    levers.train()
    levers(idx, idx)[1].backward()
    assert levers.skip_weights.grad.abs().min() > 0
    assert all(t.weight.grad[idx.unique()].abs().sum() > 0 for t in levers.value_embeds)
    # block i and block n_layer - k + i read table i: with one table, blocks 0 and 3 of 4
    one = tiny(n_layer=4, value_embeds=1)
    calls = []
    for i, block in enumerate(one.blocks):
        block.attn.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, args[4] is not None)))
    one(idx)
    assert calls == [(0, True), (1, False), (2, False), (3, True)]
    # the value tables are lookups: no FLOPs, and not counted among the non-embedding parameters
    assert one.flops_per_token() == plain.flops_per_token()
    assert one.num_params() == plain.num_params()


def test_zero_init_starts_every_block_as_the_identity() -> None:
    model = tiny(zero_init=True, n_layer=3)
    idx = torch.randint(0, 37, (2, 16))
    expected = model.lm_head(model.ln_f(model.wte(idx)))
    torch.testing.assert_close(model(idx)[0], expected)
    assert model.blocks[0].attn.c_attn.weight.std() > 0.01  # only the projections into the stream are zero


def test_explicit_attention_matches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The explicit attention that bf16 on a CPU uses is SDPA's causal attention (values and gradients),
    and a bf16 model forward on CPU takes it and stays close to the float32 one."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    ours = explicit_causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # attention dropout: with v = 1 every output is its row's sum of kept, rescaled weights (1 on average)
    dropped = explicit_causal_attention(q.detach(), k.detach(), torch.ones(2, 3, 10, 8), dropout_p=0.5)
    assert not torch.allclose(dropped, torch.ones_like(dropped)) and dropped.mean().item() == pytest.approx(1.0, abs=0.2)

    model = tiny()
    idx, targets = torch.randint(0, 37, (2, 3, 16))
    _, loss32 = model(idx, targets)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("bf16 training on a CPU should not call SDPA")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(idx, targets)
    assert loss16.item() == pytest.approx(loss32.item(), abs=0.02)


@pytest.mark.parametrize("T", [256, 130])  # four bands of queries; two of uneven length
def test_explicit_attention_in_bands_is_the_whole_causal_attention(T: int) -> None:
    """Scoring bands of queries against the keys up to each band's end skips only scores the mask zeroes: the
    values and gradients of SDPA's causal attention, and in bf16 the outputs of one (T, T) product."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16, requires_grad=True) for _ in range(3))
    ours = explicit_causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    qb, kb, vb = (t.detach().bfloat16().flatten(0, 1) for t in (q, k, v))
    future = torch.full((T, T), float("-inf"), dtype=torch.bfloat16).triu(1)
    whole = torch.baddbmm(future, qb, kb.transpose(1, 2), alpha=16 ** -0.5).softmax(dim=-1) @ vb
    torch.testing.assert_close(explicit_causal_attention(*(t.view(2, 3, T, 16) for t in (qb, kb, vb))),
                               whole.view(2, 3, T, 16), rtol=0, atol=2e-3)


def test_cpu_dropout_keeps_one_minus_p_and_rescales() -> None:
    """kernels.dropout's CPU mask (four 16-bit uniforms per 64-bit draw) behaves as F.dropout's."""
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.2)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.005)
    assert torch.equal(y[kept], torch.full_like(y[kept], 1.25))  # kept values scaled by 1/(1-p)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.2), y)  # the global seed fixes the mask (resume relies on it)
    bf = dropout(torch.ones(4, 5, 6, dtype=torch.bfloat16), 0.5)
    assert bf.dtype == torch.bfloat16 and set(bf.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(dropout(x, 0.2, training=False), x) and torch.equal(dropout(x, 0.0), x)


def test_the_model_with_dropout_compiles_as_one_graph_with_the_masks_eager_draws() -> None:
    """kernels.dropout's random draw is an operator of its own (keep_mask): torch.compile traces the whole model with
    every dropout in one graph (Tensor.random_ would break it at each one) and draws the masks eager draws, in the
    same order from the same generator, so a compiled run and an eager one see the same dropout."""
    model = tiny(dropout=0.3, value_embeds=1, unet_skips=True).train()
    x = torch.randint(0, 37, (3, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    results = []
    for m in (model, compiled):
        model.zero_grad()
        torch.manual_seed(7)
        with torch.autocast("cpu", torch.bfloat16):  # bf16: the explicit attention, with its probabilities' dropout
            loss = m(x, x)[1]
        loss.backward()
        results.append((loss.detach(), torch.get_rng_state(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_rng, eager_grads), (loss, rng, grads) = results
    assert torch.equal(rng, eager_rng)  # the same draws
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)  # another seed's masks: 5e-3 away
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(grads, eager_grads))


def test_drop_path_drops_whole_sequences_and_keeps_the_expectation() -> None:
    block = tiny(n_layer=2, drop_path=0.25).blocks[1].train()
    x = torch.ones(20_000, 3, 4, requires_grad=True)
    torch.manual_seed(2)
    y = block.drop_branch(x)
    per_seq = y.detach().flatten(1)
    kept = per_seq[:, 0] != 0
    assert torch.equal(per_seq[kept], torch.full_like(per_seq[kept], 4 / 3))  # a kept sequence: every value scaled
    assert torch.equal(per_seq[~kept], torch.zeros_like(per_seq[~kept]))     # a dropped one: all of it
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.01)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert torch.equal(block.eval().drop_branch(x), x)
    assert tiny(n_layer=2, drop_path=0.25).blocks[0].train().drop_branch(x) is x  # the first block: rate 0


def test_stochastic_depth_rises_with_depth_and_is_off_in_eval_mode() -> None:
    plain, deep = tiny(n_layer=4, dropout=0.0), tiny(n_layer=4, dropout=0.0, drop_path=0.3)
    assert [b.drop_path for b in deep.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert deep.state_dict().keys() == plain.state_dict().keys()  # no parameters: old checkpoints load
    idx = torch.randint(0, 37, (64, 16))
    assert torch.equal(deep(idx)[0], plain(idx)[0])  # eval mode: the same function (the same seed, weights)
    deep.train()
    torch.manual_seed(0)
    first = deep(idx)[0]
    torch.manual_seed(1)
    second = deep(idx)[0]
    differs = (first - second).abs().flatten(1).amax(dim=1) > 0
    assert 0 < differs.sum() < 64  # some sequences skipped a block in one pass and not in the other


def test_set_dropout_changes_every_rate_in_training_and_none_in_eval() -> None:
    deep = tiny(n_layer=2, dropout=0.2, drop_path=0.1)
    deep.set_dropout(0.0)
    assert [b.path_mask.p for b in deep.blocks] == [0.0, 0.1]  # stochastic depth keeps its own rate
    model = tiny(n_layer=2, dropout=0.2)
    model.set_dropout(0.0)
    rates = [m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "path_mask" not in name]
    assert len(rates) == 5 and set(rates) == {0.0}  # embedding, and each block's attention and MLP outputs
    assert {b.attn.attn_dropout_p for b in model.blocks} == {0.0}  # the attention weights'
    assert model.config.dropout == 0.2  # the config keeps the rate the model was built with
    idx = torch.randint(0, 37, (2, 16))
    reference = model(idx)[0]
    model.train()
    assert torch.allclose(model(idx)[0], reference, atol=1e-6)  # no dropout left
    model.set_dropout(0.5)
    assert not torch.allclose(model(idx)[0], reference, atol=1e-3)


def test_relu2_under_fp16_autocast_keeps_activations_past_256_finite() -> None:
    """float16 holds up to 65,504: the square of an activation above 256 overflows in the forward pass (a T4
    trains in fp16), where a GradScaler cannot help. The MLP squares in float32 and scales the product."""
    from model import MLP
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(vocab_size=8, n_embd=16, n_head=2, dropout=0.0, bias=True))
    x = torch.randn(2, 5, 16) * 400
    reference = mlp(x)  # float32
    with torch.autocast("cpu", dtype=torch.float16):
        h = mlp.c_fc(x)
        assert h.dtype == torch.float16 and h.max() > 256
        assert not torch.isfinite(mlp.c_proj(F.relu(h).square())).all()  # the plain square overflows
        y = mlp(x)
    assert torch.isfinite(y).all() and reference.abs().max() > 65504
    assert ((y - reference).abs().max() / reference.abs().max()).item() < 3e-3
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        mlp(x).mean().backward()  # (an overflow in the backward pass is the GradScaler's to handle)
    assert torch.isfinite(x.grad).all()


def test_queries_and_keys_meet_the_values_dtype_before_attention() -> None:
    """Apple's MPS autocast runs layer_norm in float32 but has no rule for SDPA, so normed q and k arrive in
    float32 beside half-precision v, and SDPA refuses mixed dtypes. Simulated on a CPU: norms that answer in
    float32 inside a bf16 attention, with and without the KV cache."""
    from model import CausalSelfAttention

    class Float32Out(torch.nn.Module):
        def __init__(self, norm: torch.nn.Module) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x).float()

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=8, n_embd=32, n_head=2, dropout=0.0, norm="layernorm", qk_norm=True)
    attn = CausalSelfAttention(config).to(torch.bfloat16).eval()
    attn.q_norm, attn.k_norm = Float32Out(attn.q_norm), Float32Out(attn.k_norm)
    x = torch.randn(1, 6, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        full = attn(x, None)
        from model import KVCache
        cache = KVCache(1, 1, 2, 8, 16, x.device, torch.bfloat16)
        first = attn(x[:, :5], None, cache)
        cache.pos = 5
        last = attn(x[:, 5:], None, cache)
    assert full.dtype == torch.bfloat16
    assert torch.allclose(torch.cat((first, last), 1).float(), full.float(), atol=2e-2)


def test_the_switch_off_gives_the_textbook_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT(config, cpu_kernels=False): torch's nn.Linear and nn.Dropout, attention through SDPA even for bf16 on a
    CPU, no kernel called; the same parameters as with the kernels, so the same function in float32."""
    from bookgpt import kernels
    kw = dict(dropout=0.1, drop_path=0.2, bias=True)
    plain, fast = tiny(cpu_kernels=False, **kw), tiny(**kw)
    assert {type(m) for m in plain.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Dropout))} == {
        torch.nn.Linear, torch.nn.Dropout}
    assert {type(m) for m in fast.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Dropout))} == {
        kernels.Linear, kernels.Dropout}
    assert {b.attn.cpu_attention for b in plain.blocks} == {None}
    assert {b.attn.cpu_attention for b in fast.blocks} == {kernels.explicit_causal_attention}
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))
    idx, targets = torch.randint(0, 37, (2, 3, 16))
    torch.testing.assert_close(plain(idx)[0], fast(idx)[0], rtol=0, atol=0)
    with plain.sampling_weights():
        assert not any(hasattr(m, "weight_t") for m in plain.modules())  # no sampling layout either
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    for name in ("dropout", "explicit_causal_attention"):
        monkeypatch.setattr(kernels, name, lambda *a, **k: pytest.fail("the textbook model called a CPU kernel"))
    plain.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = plain(idx, targets)
    loss.backward()
    assert len(sdpa_calls) == 2 and torch.isfinite(loss)  # one SDPA call per block


def test_a_checkpoint_saved_before_the_kernels_moved_gives_the_same_logits_and_sample(old_run) -> None:
    """A best.pt in the layout of the code before bookgpt/kernels.py, with the logits and the sample that code gave."""
    from bookgpt.checkpoint import load_run
    run, expected = old_run
    ckpt, info = load_run(run, "best")
    model, tok = GPT.from_checkpoint(ckpt, info["path"]), info["tokenizer"]
    idx = torch.tensor(tok.encode(expected["prompt"]))[None]
    with torch.no_grad():
        logits = model(idx)[0][0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits"]), rtol=0, atol=1e-4)
    out = model.generate(idx, 40, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert tok.decode(out[0].tolist()) == expected["sample_seed1_t1"]


def test_attention_gates_scale_each_heads_output() -> None:
    """A gate per head and token, sigmoid(x W): zero weights halve every head's output; a gate's weight row moves
    only its own head; off (the default) the model has no gate parameters."""
    gated, plain = tiny(attn_gate=True), tiny()
    assert sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters()) == 2 * 2 * 32
    attn, ref = gated.blocks[0].attn, plain.blocks[0].attn
    ref.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("gate")})
    x = torch.randn(3, 16, 32)
    captured = {}
    hook = lambda name: (lambda module, args, out: captured.__setitem__(name, args[0]))
    attn.c_proj.register_forward_hook(hook("gated")), ref.c_proj.register_forward_hook(hook("plain"))
    with torch.no_grad():
        attn.gate.weight.zero_()
        rope = (gated.rope_cos, gated.rope_sin)
        attn(x, rope), ref(x, rope)
        torch.testing.assert_close(captured["gated"], 0.5 * captured["plain"])
        attn.gate.weight[1] = torch.randn(32)  # head 1's gate moves; head 0 (the first 16 channels) stays at 0.5
        attn(x, rope)
        torch.testing.assert_close(captured["gated"][..., :16], 0.5 * captured["plain"][..., :16])
        assert not torch.allclose(captured["gated"][..., 16:], 0.5 * captured["plain"][..., 16:])


def test_layer_looping_runs_the_middle_blocks_twice_with_the_same_parameters() -> None:
    """loop_blocks=k: the middle k blocks run a second time right after their first, with no new parameters; the
    FLOPs count them twice; the KV cache keeps a layer per run (the cache test above)."""
    looped, plain = tiny(n_layer=4, loop_blocks=2), tiny(n_layer=4)
    assert looped.order == [0, 1, 2, 1, 2, 3] and plain.order == [0, 1, 2, 3]
    assert tiny(n_layer=5, loop_blocks=1).order == [0, 1, 2, 2, 3, 4]
    assert looped.state_dict().keys() == plain.state_dict().keys()
    looped.load_state_dict(plain.state_dict())
    runs = []
    for i, block in enumerate(looped.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: runs.append(i))
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(looped(idx)[0], plain(idx)[0])  # zero_init is off: each block does something
    assert runs == [0, 1, 2, 1, 2, 3]
    per_block = 6 * sum(m.weight.numel() for m in plain.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    assert looped.flops_per_token() - plain.flops_per_token() == 2 * (per_block + 12 * 32 * 16)
    assert len(looped.new_cache(1, torch.device("cpu")).kv) == 6
    with pytest.raises(ValueError, match="loop_blocks must be 0..n_layer = 4"):
        GPTConfig(n_layer=4, loop_blocks=5)


def test_multi_token_prediction_adds_the_token_after_next_in_training_only() -> None:
    """mtp_weight w: in training the loss is the next token's cross-entropy plus w times that of the token after
    next, predicted from one more block on the last block's output through the same norm and head; in eval mode
    (validation, evaluation, sampling) the logits and the loss are the plain model's."""
    mtp, plain = tiny(mtp_weight=0.5), tiny()
    plain.load_state_dict({k: v for k, v in mtp.state_dict().items() if not k.startswith("mtp.")})
    idx, targets = torch.randint(0, 37, (2, 3, 16))
    logits, loss = mtp(idx, targets)
    torch.testing.assert_close((logits, loss), plain(idx, targets))
    with torch.no_grad():
        for p in mtp.mtp.parameters():  # the extra block is not the identity, so its prediction differs
            p.add_(0.05 * torch.randn_like(p))
    mtp.train(), plain.train()
    mtp.set_dropout(0.0), plain.set_dropout(0.0)
    captured = {}
    mtp.blocks[-1].register_forward_hook(lambda module, args, out: captured.__setitem__("x", out))
    logits, loss = mtp(idx, targets)
    rope = (mtp.rope_cos, mtp.rope_sin)
    ahead = mtp.head(mtp.mtp(captured["x"], rope))[:, :-1]
    main = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, main + 0.5 * F.cross_entropy(ahead.flatten(0, 1), targets[:, 1:].flatten()))
    torch.testing.assert_close(main, plain(idx, targets)[1])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mtp.mtp.parameters())
