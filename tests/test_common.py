"""common.py: device and dtype choices, waiting for the right device, the device's random state and
torch.compile's fallback. No GPU here: torch.cuda and torch.mps are replaced by recorders that
behave as torch's own functions do on such machines (see each test)."""
from __future__ import annotations

import re

import pytest
import torch

from bookgpt import common
from bookgpt.common import (CompiledWithFallback, device_rng_state, resolve_device, resolve_dtype, set_device_rng_state,
                    sync)
from bookgpt.config import UserError


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A machine with two CUDA GPUs of compute capability `major` (8 = Ampere; 7 = a T4, where torch's
    is_bf16_supported() says True, counting emulation, unless including_emulation=False)."""
    calls: dict = {"set_device": [], "synchronize": [], "set_rng_state": [], "major": 8}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4" if calls["major"] < 8 else "A100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: calls["major"] >= 8 or including_emulation)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls["synchronize"].append(device))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7, int(str(device)[-1])],
                                                                                         dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls["set_rng_state"].append((state.tolist(), str(device))))
    return calls


def test_cuda_n_becomes_the_current_device_and_is_checked(fake_cuda: dict) -> None:
    # torch's per-device defaults (the RNG dropout uses, bf16 support, NCCL's object collectives)
    # follow the current device: --device=cuda:1 must make it current
    assert resolve_device("cuda:1") == "cuda:1" and fake_cuda["set_device"] == [1]
    assert resolve_device("cuda") == "cuda" and resolve_device("auto") == "cuda"
    for bad, says in (("cuda:2", "this machine has 2 GPU(s), cuda:0 to cuda:1"), ("cuda:x", "2 GPU(s)"),
                      ("cudax", "unknown device 'cudax'"), ("tpu", "unknown device 'tpu'")):
        with pytest.raises(UserError, match=re.escape(says)):
            resolve_device(bad)


def test_no_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="CUDA is not available here; use device=cpu"):
        resolve_device("cuda:0")
    assert resolve_device("auto") in ("cpu", "mps")


def test_a_t4_gets_float16_not_emulated_bfloat16(fake_cuda: dict) -> None:
    assert resolve_dtype("auto", "cuda") == "bfloat16"  # Ampere and later: native bf16
    fake_cuda["major"] = 7  # a T4 (sm75): torch.cuda.is_bf16_supported() alone says True here
    assert torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto", "cuda") == "float16"  # fp16 + GradScaler, as the README promises
    with pytest.raises(UserError, match=r"dtype=bfloat16 is only emulated on this GPU \(Tesla T4\); use dtype=float16"):
        resolve_dtype("bfloat16", "cuda:0")
    assert resolve_dtype("float32", "cuda") == "float32"


def test_mps_and_cpu_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", "mps") == "float32"  # MPS: no float64, and no bf16 autocast worth having
    for has_bf16, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: has_bf16)
        assert resolve_dtype("auto", "cpu") == want


def test_sync_waits_for_the_device_being_timed(fake_cuda: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.synchronize() with no argument waits for the current device only
    sync("cuda:1")
    sync("cuda")
    assert fake_cuda["synchronize"] == [torch.device("cuda:1"), torch.device("cuda")]
    mps = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: mps.append(1))
    sync("mps")
    sync("cpu")
    assert mps == [1] and len(fake_cuda["synchronize"]) == 2


def test_device_rng_state_is_this_devices_and_old_checkpoints_resume_on_fewer_gpus(fake_cuda: dict) -> None:
    assert device_rng_state("cpu") is None
    assert device_rng_state("cuda:1").tolist() == [7, 1]  # its own device's state, not every GPU's
    assert set_device_rng_state(torch.tensor([5, 5], dtype=torch.uint8), "cuda:1")
    assert fake_cuda["set_rng_state"] == [([5, 5], "cuda:1")]
    # a checkpoint from before saved get_rng_state_all(): a list of every visible GPU's state.
    # On a machine with fewer GPUs, set_rng_state_all would index a GPU that is not there.
    fake_cuda["set_rng_state"].clear()
    saved = [torch.tensor([i, i], dtype=torch.uint8) for i in range(8)]  # from an 8-GPU machine
    assert set_device_rng_state(saved, "cuda:1")
    assert set_device_rng_state(saved, "cuda")  # no index: the current device (0)
    assert fake_cuda["set_rng_state"] == [([1, 1], "cuda:1"), ([0, 0], "cuda")]
    assert not set_device_rng_state(saved[:1], "cuda:1")  # nothing saved for this device: the caller warns
    assert not set_device_rng_state(None, "cuda:0") and not set_device_rng_state(saved, "cpu")


def test_mps_random_state_is_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([3, 1, 4], dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: restored.append(s.tolist()))
    state = device_rng_state("mps")
    assert state.tolist() == [3, 1, 4]
    assert set_device_rng_state(state, "mps") and restored == [[3, 1, 4]]


def tiny_model() -> torch.nn.Module:
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16, dropout=0.0))


def failing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> None:
    raise RuntimeError("no C++ compiler found")


def backward_failing_backend(gm: torch.fx.GraphModule, example_inputs: list):
    """Compiles the forward fine; fails to lower the backward (torch lowers it at the first backward
    unless told to lower it with the forward)."""
    from torch._dynamo.backends.common import aot_autograd

    def bw(g: torch.fx.GraphModule, inputs: list):
        raise RuntimeError("cannot lower the backward")
    return aot_autograd(fw_compiler=lambda g, i: g.forward, bw_compiler=bw)(gm, example_inputs)


@pytest.mark.parametrize("backend", [failing_backend, backward_failing_backend])
def test_compile_that_fails_at_the_first_call_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, backend) -> None:
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=backend))
    torch._dynamo.reset()
    model, warnings = tiny_model(), []
    wrapped = CompiledWithFallback(model, warn=warnings.append)  # wrapping never fails: compile is lazy
    assert wrapped.compiled and not warnings
    x = torch.randint(11, (2, 8))
    logits, loss = wrapped(x, x)  # the first training forward: the compiler fails here ...
    loss.backward()
    assert not wrapped.compiled and "torch.compile failed (" in warnings[0] and "eager mode" in warnings[0]
    assert "RuntimeError" in wrapped.error
    expected, _ = model(x, x)
    assert torch.equal(logits, expected)  # ... and the eager model answered instead
    assert all(p.grad is not None for p in model.parameters())
    assert set(wrapped.state_dict()) == {f"module.{k}" for k in model.state_dict()}
    torch._dynamo.reset()


def test_compile_that_works_is_used_and_real_errors_still_surface(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list):
        calls.append(1)
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=counting_backend))
    torch._dynamo.reset()
    model = tiny_model()
    warnings: list[str] = []
    wrapped = CompiledWithFallback(model, warn=warnings.append)
    x = torch.randint(11, (2, 8))
    with torch.no_grad():
        out, _ = wrapped.eval()(x)
    assert calls and wrapped.compiled and (False, False) in wrapped.proven
    assert torch.allclose(out, model(x)[0])
    with pytest.raises(ValueError, match="longer than block_size"):  # eager raises it too: not swallowed
        with torch.no_grad():
            wrapped(torch.randint(11, (1, 9)))
    assert not warnings
    torch._dynamo.reset()


def test_bits_per_byte() -> None:
    import math
    assert common.bits_per_byte(math.log(2), {"tokens": 10, "bytes": 20}) == pytest.approx(0.5)
