"""LoRALinear models trained by two processes (gloo, CPU, torch backend)
under DistributedDataParallel and under FSDP2 (`fully_shard`: frozen base
weights sharded, only the LoRA parameters trained) reach the same losses,
gradients and parameters as one process on the concatenated batch.

Each worker writes what it saw to a file; the test compares it with a single
process run here. The processes meet through a FileStore in a temporary
folder (no port to find), and everything has a timeout."""

import datetime
import pathlib
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fused_lora
from fused_lora import LoRALinear

WORLD_SIZE = 2
STEPS = 3
PER_RANK = 4  # sequences per process per step; the single process takes all 8
TIMEOUT_S = 90


def build_model() -> nn.Module:
    """Two LoRA layers; A and B random so that both get gradients at step 1."""
    torch.manual_seed(0)
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False)
    return nn.Sequential(LoRALinear(16, 32, **kwargs), nn.GELU(), LoRALinear(32, 10, **kwargs))


def batches():
    """STEPS full batches: x (2 * PER_RANK, 5, 16) and targets (..., 10)."""
    generator = torch.Generator().manual_seed(1)
    n = WORLD_SIZE * PER_RANK

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return [(randn(n, 5, 16), randn(n, 5, 10)) for _ in range(STEPS)]


def lora_parameters(model):
    return {name.removeprefix("module."): p for name, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, rank=0, world_size=1):
    """STEPS of SGD on the LoRA parameters with this process's slice of each
    batch. Returns the global losses and, per step, the full LoRA gradients,
    and the final full LoRA parameters."""
    optimizer = torch.optim.SGD(lora_parameters(model).values(), lr=0.5)
    losses, grads = [], []
    for x, target in batches():
        rows = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        loss = F.mse_loss(model(x[rows]), target[rows])
        loss.backward()
        if world_size > 1:  # the mean of equal halves' means is the full batch's mean
            loss = loss.detach().clone()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
        grads.append({name: full(p.grad).clone() for name, p in lora_parameters(model).items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = {name: full(p.detach()).clone() for name, p in lora_parameters(model).items()}
    return dict(losses=losses, grads=grads, params=params)


def _worker(rank: int, mode: str, folder: str) -> None:
    fused_lora.set_backend("torch")
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        model = build_model()
        facts = {}
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (WORLD_SIZE,))
            for layer in model:
                if isinstance(layer, LoRALinear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            weight = model[0].weight
            facts = dict(
                weight_sharded=isinstance(weight, DTensor) and weight.to_local().shape[0] == 32 // WORLD_SIZE,
                weight_frozen=not weight.requires_grad,
            )
        result = train(model, rank, WORLD_SIZE)
        if rank == 0:
            torch.save(dict(result, **facts), pathlib.Path(folder) / "result.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(mode: str, folder: pathlib.Path) -> dict:
    """Spawn WORLD_SIZE workers and return rank 0's result; kill them on timeout."""
    context = mp.start_processes(_worker, args=(mode, str(folder)), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + 2 * TIMEOUT_S
    try:
        while not context.join(timeout=1):  # raises if a worker failed
            if time.monotonic() > deadline:
                pytest.fail(f"{mode} workers did not finish in {2 * TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return torch.load(folder / "result.pt")


@pytest.fixture(scope="module")
def single_process():
    with fused_lora.set_backend("torch"):
        return train(build_model())


def assert_same_training(got, want):
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        assert g.keys() == w.keys() == {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"}
        for name in w:
            assert w[name].abs().sum() > 0, f"step {step}: d{name} is zero, the comparison would prove nothing"
            torch.testing.assert_close(g[name], w[name], msg=lambda m, n=name, s=step: f"step {s}, d{n}: {m}")
    for name in want["params"]:
        torch.testing.assert_close(got["params"][name], want["params"][name])


def test_ddp_matches_one_process(tmp_path, single_process):
    assert_same_training(run_distributed("ddp", tmp_path), single_process)


def test_fsdp2_matches_one_process(tmp_path, single_process):
    result = run_distributed("fsdp2", tmp_path)
    assert result["weight_sharded"] and result["weight_frozen"]
    assert_same_training(result, single_process)
