"""optim.py: the learning-rate schedule, Muon (batched by shape), and the step that clips and updates
every optimizer together or, when fp16's GradScaler finds an overflow, none of them; the weight average."""
from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig
from bookgpt.optim import (Muon, OptimConfig, WeightAverage, dropout_at, lr_factor, make_optimizers, optimizer_step, set_lr,
                           zeropower_via_newtonschulz5)


def test_lr_schedules() -> None:
    cfg = OptimConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_schedule="cosine")
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(1 / 11)
    assert lr_factor(cfg, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_factor(cfg, 99, 1.0) == pytest.approx(0.1)
    wsd = OptimConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=0, lr_schedule="wsd", decay_frac=0.2)
    assert lr_factor(wsd, 5, 0.79) == 1.0
    assert lr_factor(wsd, 5, 0.9) == pytest.approx(0.55)
    assert lr_factor(wsd, 5, 1.0) == pytest.approx(0.1)


def test_dropout_schedule_rises_in_four_stages_then_holds() -> None:
    assert dropout_at(0.3, 0.0, 0.0) == 0.3  # no ramp: the same rate throughout
    assert [dropout_at(0.3, 1.0, p) for p in (0.0, 0.24, 0.25, 0.5, 0.74, 0.75, 1.0)] == pytest.approx(
        [0.0, 0.0, 0.1, 0.2, 0.2, 0.3, 0.3])
    assert [dropout_at(0.3, 0.5, p) for p in (0.1, 0.2, 0.4, 0.6, 1.0)] == pytest.approx([0.0, 0.1, 0.3, 0.3, 0.3])


def test_newton_schulz_orthogonalises() -> None:
    torch.manual_seed(0)
    for shape in [(32, 32), (64, 16), (16, 64)]:
        O = zeropower_via_newtonschulz5(torch.randn(*shape)).float()
        s = torch.linalg.svdvals(O)
        # Muon's quintic iteration maps singular values into roughly [0.7, 1.2], not exactly 1
        assert s.min() > 0.5 and s.max() < 1.3, s


def test_muon_weight_decay_is_decoupled_and_old_states_load() -> None:
    torch.manual_seed(0)
    w0, grad = torch.randn(16, 8), torch.randn(16, 8)
    after = {}
    for wd in (0.0, 0.5):
        p = torch.nn.Parameter(w0.clone())
        p.grad = grad.clone()
        Muon([p], lr=0.1, weight_decay=wd).step()
        after[wd] = p.detach()
    # the same orthogonalised step, plus a shrink of lr * wd = 5% of the weight before it
    assert torch.allclose(after[0.5] - after[0.0], -0.05 * w0, atol=1e-6)
    assert not torch.equal(after[0.0], w0)
    # a state saved before the option existed has no weight_decay in its groups: it loads as 0
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, weight_decay=0.3)
    state = opt.state_dict()
    for key in ("weight_decay", "decay_with_lr", "peak_lr"):
        del state["param_groups"][0][key]
    opt.load_state_dict(state)
    p.grad = grad.clone()
    opt.step()
    assert torch.allclose(p.detach(), after[0.0], atol=1e-6)


def test_muon_weight_decay_follows_the_rate_or_stays_constant() -> None:
    """With a zero gradient the update is zero, so a step is the shrink alone: at a tenth of the peak
    rate, the lr schedule shrinks by 0.1 * 0.2 * 0.5 = 1%, the constant one by 0.2 * 0.5 = 10%."""
    w0 = torch.randn(16, 8)
    cfg = OptimConfig(muon_lr=0.2, muon_weight_decay=0.5)
    for schedule, shrink in (("lr", 0.01), ("constant", 0.1)):
        cfg.muon_wd_schedule = schedule
        model = torch.nn.Module()
        model.lm_head = torch.nn.Linear(8, 4, bias=False)
        model.w = torch.nn.Parameter(w0.clone())
        _adamw, muon = make_optimizers(model, cfg, "cpu")
        set_lr([muon], cfg, 0.1)
        model.w.grad = torch.zeros_like(w0)
        muon.step()
        assert torch.allclose(model.w.detach(), (1 - shrink) * w0, atol=1e-6), schedule
        # the choice travels in the optimizer's state, so a resumed run keeps it
        state = muon.state_dict()
        assert state["param_groups"][0]["decay_with_lr"] == (schedule == "lr")


def reference_muon_step(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, momentum: float = 0.95) -> None:
    """Muon one matrix at a time, as it was written before matrices were batched."""
    buf.mul_(momentum).add_(grad)
    update = zeropower_via_newtonschulz5(grad.add(buf, alpha=momentum))
    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def test_batched_newton_schulz_equals_one_matrix_at_a_time() -> None:
    torch.manual_seed(0)
    for shape in [(48, 16), (16, 48), (24, 24)]:
        stack = torch.randn(5, *shape)
        batched = zeropower_via_newtonschulz5(stack)
        for i in range(5):
            assert torch.allclose(batched[i], zeropower_via_newtonschulz5(stack[i]), atol=1e-5)


def test_muon_steps_matrices_of_each_shape_together_as_it_would_one_by_one() -> None:
    torch.manual_seed(0)
    shapes = [(32, 16), (16, 32), (32, 16), (24, 24), (32, 16)]
    weights = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = Muon(params, lr=0.05)
    ref = [w.clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    for step in range(3):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        for r, g, b in zip(ref, grads[step], bufs):
            reference_muon_step(r, g, b, lr=0.05)
    for p, r in zip(params, ref):
        assert torch.allclose(p.detach(), r, atol=1e-5)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, bufs))


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0))


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_fp16_overflow_in_one_optimizers_gradients_skips_every_optimizer(grad_clip: float) -> None:
    """fp16 + Muon: an inf in AdamW's gradients (the embedding, here) made the shared clip's norm
    inf, so every gradient was scaled by 0 or NaN, and Muon, whose own gradients were finite (its
    found_inf 0), stepped with them. Now no weight may change, and the scale must drop."""
    model = tiny_model()
    cfg = OptimConfig(optimizer="muon", learning_rate=1e-2, muon_lr=0.02)
    optimizers = make_optimizers(model, cfg, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randint(11, (2, 8))
    _, loss = model(x, x)
    scaler.scale(loss).backward()
    model.wte.weight.grad[3, 5] = float("inf")  # an overflow in one gradient AdamW owns
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not optimizer_step(optimizers, scaler, model.parameters(), grad_clip)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scaler.get_scale() == 512.0 and all(p.grad is None for p in model.parameters())
    # the next, finite step goes through for both optimizers
    _, loss = model(x, x)
    scaler.scale(loss).backward()
    assert optimizer_step(optimizers, scaler, model.parameters(), grad_clip)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "blocks.0.attn.c_attn.weight" in changed and "wte.weight" in changed  # Muon's and AdamW's


def test_tables_go_to_adamw_and_hidden_matrices_to_muon() -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, value_embeds=1,
                          unet_skips=True))
    adamw, muon = make_optimizers(model, OptimConfig(optimizer="muon"), "cpu")
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    decayed, plain = ({id(p) for p in g["params"]} for g in adamw.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} == {"wte.weight", "value_embeds.0.weight"}  # (the head is tied to wte)
    assert "skip_weights" in {names[i] for i in plain} and "blocks.0.attn.c_attn.weight" in {names[i] for i in in_muon}
    assert decayed | plain | in_muon == set(names) and not (decayed | plain) & in_muon


def test_clipping_without_a_scaler_bounds_the_global_norm() -> None:
    model = tiny_model()
    p = model.blocks[0].mlp.c_fc.weight
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen["norm"] = torch.nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None])
            return super().step(closure)

    for q in model.parameters():
        q.grad = torch.full_like(q, 10.0)
    optimizer_step([Spy(model.parameters(), lr=0.0)], torch.amp.GradScaler("cpu", enabled=False),
                   model.parameters(), grad_clip=1.0)
    assert seen["norm"] == pytest.approx(1.0, rel=1e-4) and p.grad is None


def test_set_lr_scales_each_optimizers_own_peak() -> None:
    model = tiny_model()
    cfg = OptimConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02)
    adamw, muon = make_optimizers(model, cfg, "cpu")
    set_lr([adamw, muon], cfg, 0.5)
    assert {g["lr"] for g in adamw.param_groups} == {5e-4} and {g["lr"] for g in muon.param_groups} == {0.01}


def test_weight_average_follows_its_formula_and_swaps_back() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightAverage(model, decay=0.5)
    expected = torch.ones(1, 2)
    for t, value in enumerate((3.0, 5.0, 7.0), start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))  # the early steps weigh the new weights more
        expected = d * expected + (1 - d) * value
    assert torch.allclose(ema.avg[0], expected)
    with ema.swapped_in():
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, torch.full((1, 2), 7.0))  # the trained weights are back
    other = WeightAverage(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and torch.equal(other.avg[0], ema.avg[0])


def test_muon_orthogonalises_each_shape_once_per_step() -> None:
    """Matrices of one shape share one batched Newton-Schulz pass: a step's matrix products are 15 (5
    iterations of 3) per distinct shape, however many layers there are. One pass per matrix, which launches
    ~56 small kernels each and costs a GPU more than the arithmetic, would be 15 per matrix."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm,
                                       torch.ops.aten.baddbmm, torch.ops.aten.matmul):
                self.count += 1
            return func(*args, **(kwargs or {}))

    model = GPT(GPTConfig(vocab_size=32, n_layer=4, n_head=2, n_embd=16, block_size=8))
    muon = make_optimizers(model, OptimConfig(optimizer="muon"), "cpu")[1]
    matrices = [p for g in muon.param_groups for p in g["params"]]
    shapes = {p.shape for p in matrices}
    assert (len(matrices), len(shapes)) == (16, 4)  # c_attn, attention's c_proj, c_fc, the MLP's c_proj: x 4 blocks
    for p in matrices:
        p.grad = torch.randn_like(p)
    with Products() as products:
        muon.step()
    assert products.count == 15 * len(shapes)
