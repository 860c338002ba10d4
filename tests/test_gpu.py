"""CUDA gives the numbers of the CPU path: one SAE training step and MonoLoss, float32.

Marked `gpu`: skipped (with the reason) where CUDA is absent, run where it is present.
On CUDA `impl: auto` takes the dense kernels and the CPU the sparse ones, so this also
checks the two implementations against each other across devices.
"""

from __future__ import annotations

import pytest
import torch

from monoray.metrics import mono_loss
from monoray.sae import ARCH_NAMES, SAEConfig, build_sae

pytestmark = pytest.mark.gpu
D_IN, D_SAE, K, B = 32, 128, 8, 256
RTOL, ATOL = 1e-4, 1e-5
"""float32 on two devices (TF32 off): reductions in another order, nothing else."""


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D_IN, generator=gen)
    return x / x.norm(dim=1, keepdim=True), torch.randn(B, 16, generator=gen)


def close(cpu: torch.Tensor, cuda: torch.Tensor, what: str) -> None:
    cuda = cuda.cpu()
    diff = (cpu - cuda).abs().max().item()
    assert torch.allclose(cpu, cuda, rtol=RTOL, atol=ATOL), f"{what}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_sae_training_step_on_cuda_equals_cpu(arch: str) -> None:
    x, emb = data()
    cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, mono_coef=0.1, seed=1)
    steps = {}
    for device in ("cpu", "cuda"):
        sae = build_sae(cfg).to(device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        out = sae.forward_train(x.to(device), emb.to(device))
        out.loss.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step(opt)
        steps[device] = (out, dict(sae.named_parameters()))
    (cpu, cpu_params), (gpu, gpu_params) = steps["cpu"], steps["cuda"]
    for key, value in cpu.loss.metrics().items():
        close(torch.as_tensor(value), torch.as_tensor(gpu.loss.metrics()[key]), key)
    close(cpu.recon.detach(), gpu.recon.detach(), "recon")
    for name, p in cpu_params.items():
        close(p.grad, gpu_params[name].grad, f"grad {name}")
        close(p.detach(), gpu_params[name].detach(), f"updated {name}")


def test_mono_loss_and_gradient_on_cuda_equal_cpu() -> None:
    _, emb = data()
    acts = torch.relu(torch.randn(B, D_SAE, generator=torch.Generator().manual_seed(2)))
    values = {}
    for device in ("cpu", "cuda"):
        a = acts.to(device).requires_grad_(True)
        loss = mono_loss(emb.to(device), a, precision="float32")
        loss.backward()
        values[device] = (loss.detach(), a.grad)
    close(values["cpu"][0], values["cuda"][0], "loss")
    close(values["cpu"][1], values["cuda"][1], "gradient")
