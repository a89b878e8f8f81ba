"""LoRA models trained by two processes (gloo, CPU, torch backend) reach the
same losses, gradients and parameters as one process on the concatenated
batch: LoRALinear layers under DistributedDataParallel and under FSDP2
(`fully_shard`: frozen base weights sharded, only the LoRA parameters
trained), and MultiLoRALinear layers under DDP with per-sequence adapters,
one of which has no rows on one of the processes. Quantized bases too: NF4
and FP8 from quantize_base under both, and bitsandbytes' Linear4bit under
FSDP2 (FSDP-QLoRA: the packed 4-bit weight sharded, frozen).

Each worker writes what it saw to a file; the tests compare it with a single
process run here. The processes meet through a FileStore in a temporary
folder (no port to find), and everything has a timeout. One DDP run trains
both models (starting processes costs more than training them)."""

import datetime
import importlib.util
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
from fused_lora import LoRALinear, MultiLoRALinear

WORLD_SIZE = 2
STEPS = 3
PER_RANK = 4  # sequences per process per step; the single process takes all 8
TIMEOUT_S = 90
EXIT_GRACE_S = 10
# One adapter per sequence (-1: the base layer); rank 0 takes the first four,
# so adapter 2 ("c") has no rows there: DDP must still average its gradient.
ADAPTER_IDS = torch.tensor([0, 1, -1, 0, 2, 1, 0, 2])
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# The models each mode trains: LoRA over dense, quantize_base NF4 and FP8 bases (and Linear4bit ones).
DDP_KINDS = ("lora", "multi", "nf4", "fp8")
FSDP2_KINDS = ("lora", "nf4", "fp8") + (("bnb",) if HAS_BNB else ())


class MultiNet(nn.Module):
    """Two MultiLoRALinear layers with adapters a, b, c (A and B random)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = MultiLoRALinear(16, 32), MultiLoRALinear(32, 10)
        for name, r in zip("abc", (4, 2, 3), strict=True):
            self.first.add_adapter(name, r, 2 * r, init_lora_weights=False)
            self.second.add_adapter(name, r + 1, r, init_lora_weights=False)

    def forward(self, x, adapter_ids):
        return self.second(F.gelu(self.first(x, adapter_ids)), adapter_ids)


def build_model(kind: str = "lora") -> nn.Module:
    """Two LoRA layers; A and B random so that both get gradients at step 1.
    "nf4" / "fp8": their bases quantized by quantize_base; "bnb": over
    bitsandbytes NF4 Linear4bit layers (nested statistics)."""
    torch.manual_seed(0)
    if kind == "multi":
        return MultiNet()
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False)
    if kind == "bnb":
        return nn.Sequential(linear4bit(32, 16, kwargs), nn.GELU(), linear4bit(10, 32, kwargs))
    model = nn.Sequential(LoRALinear(16, 32, **kwargs), nn.GELU(), LoRALinear(32, 10, **kwargs))
    if kind in ("nf4", "fp8"):
        fused_lora.quantize_base(model, kind)
    return model


def linear4bit(n: int, k: int, lora_kwargs: dict) -> LoRALinear:
    """A LoRALinear over a bitsandbytes NF4 Linear4bit (k -> n) with a random weight."""
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(k, n, compute_dtype=torch.float32, quant_type="nf4")
    module.weight = bnb.nn.Params4bit(torch.randn(n, k) / k**0.5, quant_type="nf4", module=module)
    return LoRALinear.from_linear(module.to("cpu"), **lora_kwargs)  # bitsandbytes quantizes on the move


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


def train(model, kind="lora", rank=0, world_size=1):
    """STEPS of SGD on the LoRA parameters with this process's slice of each
    batch. Returns the global losses and, per step, the full LoRA gradients,
    and the final full LoRA parameters."""
    optimizer = torch.optim.SGD(lora_parameters(model).values(), lr=0.5)
    losses, grads = [], []
    for x, target in batches():
        rows = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        args = (ADAPTER_IDS[rows],) if kind == "multi" else ()
        loss = F.mse_loss(model(x[rows], *args), target[rows])
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
        results = {}
        if mode == "ddp":
            for kind in DDP_KINDS:
                # gloo cannot broadcast float8 tensors: DDP's initial broadcast is skipped for FP8 bases (every
                # rank builds the same model from the same seed, as it loads the same checkpoint). NCCL can.
                model = nn.parallel.DistributedDataParallel(build_model(kind), init_sync=kind != "fp8")
                results[kind] = train(model, kind, rank, WORLD_SIZE)
        else:
            mesh = init_device_mesh("cpu", (WORLD_SIZE,))
            for kind in FSDP2_KINDS:
                model = build_model(kind)
                rows = model[0].weight.shape[0]  # 32 dense; 256 packed NF4 bytes; 32 FP8 rows
                for layer in model:
                    if isinstance(layer, LoRALinear):
                        fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                weight = model[0].weight
                facts = dict(
                    weight_sharded=isinstance(weight, DTensor) and weight.to_local().shape[0] == rows // WORLD_SIZE,
                    weight_frozen=not weight.requires_grad,
                )
                results[kind] = dict(train(model, kind, rank, WORLD_SIZE), **facts)
        dist.barrier()  # both ranks done before either tears down
        if rank == 0:  # written whole, then renamed: the parent never reads half a file
            torch.save(results, pathlib.Path(folder) / "result.tmp")
            (pathlib.Path(folder) / "result.tmp").rename(pathlib.Path(folder) / "result.pt")
    finally:
        dist.destroy_process_group()


def _joined(context, result: pathlib.Path) -> bool:
    """Whether every worker has exited; raises if one failed before the
    results were whole (a failure in teardown after them is only logged)."""
    try:
        return context.join(timeout=1)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        if not result.exists():
            raise
        print(f"a worker failed after writing its results: {error}")
        return True


def run_distributed(mode: str, folder: pathlib.Path) -> dict:
    """Spawn WORLD_SIZE workers and return rank 0's results; kill them on
    timeout. Once the results are written a worker gets EXIT_GRACE_S to exit:
    gloo's teardown has been seen to hang in one process (on a futex in
    destroy_process_group) after both had finished, when the machine had just
    run the compile tests' process pool."""
    context = mp.start_processes(_worker, args=(mode, str(folder)), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + 2 * TIMEOUT_S
    result = folder / "result.pt"
    try:
        while not _joined(context, result):
            if result.exists():
                deadline = min(deadline, time.monotonic() + EXIT_GRACE_S)
                if time.monotonic() > deadline:
                    break  # the results are whole; a teardown that hangs is killed below
            elif time.monotonic() > deadline:
                pytest.fail(f"{mode} workers did not finish in {2 * TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return torch.load(folder / "result.pt")


@pytest.fixture(scope="module")
def single_process():
    with fused_lora.set_backend("torch"):
        return {kind: train(build_model(kind), kind) for kind in dict.fromkeys(DDP_KINDS + FSDP2_KINDS)}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run_distributed("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return run_distributed("fsdp2", tmp_path_factory.mktemp("fsdp2"))


def assert_same_training(got, want, names):
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        assert g.keys() == w.keys() == names
        for name in w:
            assert w[name].abs().sum() > 0, f"step {step}: d{name} is zero, the comparison would prove nothing"
            torch.testing.assert_close(g[name], w[name], msg=lambda m, n=name, s=step: f"step {s}, d{n}: {m}")
    assert got["params"].keys() == names
    for name in want["params"]:
        torch.testing.assert_close(got["params"][name], want["params"][name])


LORA_NAMES = {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"}
MULTI_NAMES = {f"{layer}.lora_{ab}.{name}.weight" for layer in ("first", "second") for ab in "AB" for name in "abc"}


def test_ddp_matches_one_process(ddp, single_process):
    assert_same_training(ddp["lora"], single_process["lora"], LORA_NAMES)


def test_ddp_with_multi_lora_layers_matches_one_process(ddp, single_process):
    assert 2 not in ADAPTER_IDS[:PER_RANK] and 2 in ADAPTER_IDS[PER_RANK:], "adapter c has rows on rank 1 only"
    assert_same_training(ddp["multi"], single_process["multi"], MULTI_NAMES)


def test_fsdp2_matches_one_process(fsdp2, single_process):
    result = fsdp2["lora"]
    assert result["weight_sharded"] and result["weight_frozen"]
    assert_same_training(result, single_process["lora"], LORA_NAMES)


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_quantized_bases_under_ddp_match_one_process(kind, ddp, single_process):
    assert_same_training(ddp[kind], single_process[kind], LORA_NAMES)


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_quantized_bases_under_fsdp2_match_one_process(kind, fsdp2, single_process):
    """The packed base (NF4 bytes, FP8 e4m3) sharded and frozen, its statistics replicated."""
    result = fsdp2[kind]
    assert result["weight_sharded"] and result["weight_frozen"]
    assert_same_training(result, single_process[kind], LORA_NAMES)


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes: pip install -e '.[test]'")
def test_fsdp2_over_bitsandbytes_linear4bit_matches_one_process(fsdp2, single_process):
    """FSDP-QLoRA: LoRA layers over bitsandbytes' Params4bit, sharded by fully_shard."""
    result = fsdp2["bnb"]
    assert result["weight_sharded"] and result["weight_frozen"]
    assert_same_training(result, single_process["bnb"], LORA_NAMES)
