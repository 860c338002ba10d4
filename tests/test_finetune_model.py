"""Finetune model pieces: the exact qkv split, LoRA placement, frozen weights, weight loading,
and the distributed step (2 gloo ranks under DDP) against one process on the whole batch."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from monoray.errors import InputError
from monoray.extract.sources import DigitsSource
from monoray.finetune.backbones import Backbone, SplitQKV, build_backbone, split_qkv
from monoray.finetune.config import FinetuneConfig
from monoray.finetune.data import FinetuneData, ImageSplit, build_transform
from monoray.finetune.loop import World, build_model, evaluate, local_rows, step_loss
from monoray.finetune.model import FinetuneModel


def _cfg(**changes) -> FinetuneConfig:
    base = {
        "backbone": "resnet50",
        "embeddings": "unused",
        "random_init": True,
        "image_size": 32,
        "mono_coef": 0.1,
        "lr": 0.05,
    }
    return FinetuneConfig.from_dict({**base, **changes})


def test_split_qkv_equals_the_fused_projection():
    torch.manual_seed(0)
    fused = nn.Linear(48, 3 * 48)
    split = SplitQKV(fused)
    x = torch.randn(5, 7, 48)
    torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-6)
    assert torch.equal(split.k.weight, fused.weight[48:96])
    assert torch.equal(split.v.bias, fused.bias[96:])


def test_split_vit_gives_the_same_features():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_base_patch32_clip_quickgelu_224", pretrained=False, num_classes=0, img_size=32
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = vit(x)
        assert split_qkv(vit) == 12
        after = vit(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("backbone", "n_lora", "target"),
    [("resnet50", 16, ".conv2"), ("clip-vit-b32", 24, ".attn.qkv.")],
)
def test_lora_trains_and_leaves_the_frozen_backbone_unchanged(backbone, n_lora, target):
    cfg = _cfg(backbone=backbone)
    model, _, _ = build_model(cfg, n_classes=4)
    lora_a = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == n_lora and all(target in n for n in lora_a)
    if backbone == "clip-vit-b32":  # query and value only, never the key
        assert {n.split(".attn.qkv.")[1][0] for n in lora_a} == {"q", "v"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or not n.startswith("backbone.") for n in trainable)
    frozen = {
        n: t.detach().clone()
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if n not in trainable
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(1)
    x, y, emb = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,)), torch.randn(6, 8)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        step_loss(model, x, y, emb, cfg, World(0, 1), 6).backward.backward()
        opt.step()
    for name, value in [*model.named_parameters(), *model.named_buffers()]:
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"{name} changed"
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert any("lora_B" in n for n in changed)  # LoRA B starts at 0 and moves
    assert {"mono.0.weight", "classifier.weight"} <= set(changed)


def test_weights_load_from_a_local_safetensors_file(tmp_path):
    import timm

    torch.manual_seed(3)
    reference = timm.create_model("resnet50", pretrained=False)
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    bb = build_backbone("resnet50", weights=str(path), image_size=32, lora_r=16, lora_alpha=32)
    saved = load_file(str(path))
    loaded = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in bb.model.named_parameters()
        if "lora_" not in n
    }
    assert torch.equal(loaded["conv1.weight"], saved["conv1.weight"])
    assert torch.equal(loaded["layer3.2.conv2.weight"], saved["layer3.2.conv2.weight"])
    assert bb.weights_id == "resnet50.safetensors"


def test_weights_are_never_implicit(tmp_path, capsys):
    with pytest.raises(InputError, match="exactly one of weights"):
        FinetuneConfig.from_dict({"embeddings": "e"})
    with pytest.raises(InputError, match="exactly one of weights"):
        FinetuneConfig.from_dict({"embeddings": "e", "weights": "w.pt", "random_init": True})
    with pytest.raises(InputError, match="weight file not found"):
        build_backbone(
            "resnet50", weights=str(tmp_path / "no.pth"), image_size=32, lora_r=16, lora_alpha=32
        )
    from monoray.cli import main

    args = ["finetune", "--weights", str(tmp_path / "no.pth"), "--embeddings", str(tmp_path)]
    code = main([*args, "--out", str(tmp_path / "run"), "--images", "digits"])
    err = capsys.readouterr().err
    assert code == 2 and "weight file not found" in err and err.count("\n") == 1


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(InputError, match="did you mean 'mono_coef'"):
        _cfg(mono_coeff=0.1)
    with pytest.raises(InputError, match="backbone must be one of"):
        _cfg(backbone="resnet18")
    with pytest.raises(InputError, match="augment must be one of"):
        _cfg(augment="autoaugment")
    assert _cfg(lr="0.01", epochs=3.0).to_dict()["epochs"] == 3


# --- the distributed step: 2 gloo ranks under DDP == one process on the whole batch -------

N_ROWS, D_EMB = 13, 6  # 13 rows: ranks get 7 and 6, so unequal shards are covered


def _tiny_model() -> FinetuneModel:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))  # stands in for LoRA
    backbone = Backbone(trunk, dim=10, mean=(0, 0, 0), std=(1, 1, 1), weights_id="test")
    return FinetuneModel(backbone, n_classes=3, expansion=2).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N_ROWS, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_ROWS,), generator=g)
    emb = torch.randn(N_ROWS, D_EMB, generator=g, dtype=torch.float64)
    return x, y, emb


def _step(net: nn.Module, world: World) -> tuple[float, dict[str, torch.Tensor]]:
    x, y, emb = _batch()
    rows = local_rows(torch.arange(N_ROWS), world)
    cfg = _cfg(mono_coef=0.3)
    terms = step_loss(net, x[rows], y[rows], emb[rows], cfg, world, N_ROWS)
    terms.backward.backward()
    sums = terms.sums()
    if world.size > 1:
        torch.distributed.all_reduce(sums)
    ce, mono = float(sums[0]) / N_ROWS, float(sums[1]) / world.size
    model = net.module if hasattr(net, "module") else net
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ce + cfg.mono_coef * mono, grads


def _val_data() -> FinetuneData:
    """11 digits images (4x4 px) with random 6-d embeddings: an odd count, so shards differ."""
    source = DigitsSource()
    listing = source.listing()
    ids = np.arange(11)
    emb = np.random.default_rng(2).standard_normal((11, D_EMB)).astype(np.float32)
    split = ImageSplit(source, listing.refs[:11], ids, listing.labels[:11] % 3, emb, ids)
    return FinetuneData(split, split, n_classes=3, embedding_dim=D_EMB, record={})


def _validate(world: World) -> dict[str, torch.Tensor]:
    model = _tiny_model().float()
    tf = build_transform("none", 4, (0.5,) * 3, (0.5,) * 3, train=False)
    cfg = _cfg(eval_batch_size=1)  # same float32 forward per image however the split is sharded
    val = evaluate(model, _val_data(), tf, cfg, world, torch.device("cpu"))
    return {"scores": val.scores, **{k: torch.tensor(v) for k, v in val.metrics.items()}}


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = nn.parallel.DistributedDataParallel(_tiny_model())
        loss, grads = _step(net, World(rank, world))
        val = {f"val.{k}": v for k, v in _validate(World(rank, world)).items()}
        if rank == 0:
            save_file({"loss": torch.tensor(loss, dtype=torch.float64), **grads, **val}, out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.safetensors"
    mp.spawn(_ddp_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    loss, grads = _step(_tiny_model(), World(0, 1))
    ddp = load_file(str(out))
    assert abs(float(ddp.pop("loss")) - loss) < 1e-6
    val = _validate(World(0, 1))  # validation: exact across ranks via the accumulators
    for key, value in val.items():
        torch.testing.assert_close(ddp.pop(f"val.{key}"), value, rtol=0, atol=1e-12, msg=key)
    assert val["accuracy"] > 0 and 0 < val["monoscore_mean"] < 1 and val["purity_binary"] > 0
    assert set(ddp) == set(grads) and len(grads) == 6  # trunk, mono layer, classifier
    for name, g in grads.items():
        torch.testing.assert_close(ddp[name], g, rtol=0, atol=1e-6, msg=name)
    assert grads["mono.0.weight"].abs().max() > 1e-3  # the check is not vacuous
