"""How the benchmark times a function: CUDA events on a GPU, wall clock on a CPU.

    measure(make_call, device)          -> Timing (median ms, every raw sample)
    measure_all({name: make_call}, device) -> {name: Timing}, side by side

`make_call(i)` returns the i-th zero-argument callable to time. On a GPU the
calls rotate over input sets whose total size passes L2, so a case is not
timed on inputs that sit in cache from the previous iteration.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

L2_BYTES = {"H100": 50 * 2**20, "H200": 60 * 2**20}
DEFAULT_L2_BYTES = 64 * 2**20


@dataclasses.dataclass
class Timing:
    median_ms: float
    samples_ms: list[float]

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: runs closer than this are noise."""
        if len(self.samples_ms) < 5:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=5)
        return (q[3] - q[0]) / self.median_ms


def l2_bytes(device: torch.device) -> int:
    name = torch.cuda.get_device_name(device)
    return next((size for key, size in L2_BYTES.items() if key in name), DEFAULT_L2_BYTES)


def rotations(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to cycle through so that together they exceed L2."""
    if device.type != "cuda":
        return 1
    return max(1, -(-2 * l2_bytes(device) // max(bytes_per_set, 1)))


def measure(make_call: Callable[[int], Callable[[], object]], device: torch.device, n_sets: int = 1, quick=False):
    """Time the calls made by make_call(0 .. n_sets - 1), cycled.

    GPU: triton.testing.do_bench (CUDA events, warm-up first, the L2 flushed
    between calls), every sample kept. CPU: perf_counter around each call
    after two warm-up calls, until a time budget or a sample count is spent."""
    calls = [make_call(i) for i in range(n_sets)]
    state = {"i": 0}

    def step():
        calls[state["i"] % n_sets]()
        state["i"] += 1

    if device.type == "cuda":
        import triton.testing

        samples = triton.testing.do_bench(step, warmup=5 if quick else 25, rep=20 if quick else 200, return_mode="all")
        samples = [float(s) for s in samples]
    else:
        budget, max_samples = (0.2, 3) if quick else (2.0, 30)
        for _ in range(2):
            step()
        samples = []
        start = time.perf_counter()
        while len(samples) < max_samples and (len(samples) < 3 or time.perf_counter() - start < budget):
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), samples)


def measure_all(makers: dict, device: torch.device, n_sets: int = 1, quick=False) -> dict:
    """Time several implementations of one case side by side.

    GPU: one after another (CUDA events are not disturbed by the host). CPU:
    interleaved, one call of each per round, so that load from elsewhere or
    a change of clock speed falls on all of them alike instead of on
    whichever ran during it."""
    if device.type == "cuda":
        return {name: measure(make, device, n_sets, quick) for name, make in makers.items()}
    calls = {name: [make(i) for i in range(n_sets)] for name, make in makers.items()}
    budget, max_rounds = (0.2 * len(calls), 3) if quick else (2.0 * len(calls), 30)
    for name in calls:  # warm-up
        calls[name][0]()
    samples = {name: [] for name in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < 3 or time.perf_counter() - start < budget):
        for name, versions in calls.items():
            t0 = time.perf_counter()
            versions[rounds % n_sets]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: Timing(statistics.median(s), s) for name, s in samples.items()}
