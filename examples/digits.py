"""Teach a digit classifier two new digits with LoRA only.

The classic "teach a model two new digits with LoRA alone" experiment on scikit-learn's 8x8 digits
(1,797 images, shipped with scikit-learn: no download):

1. train a small MLP (nn.Linear layers) on the digits 0-7 only: it cannot
   recognise 8 and 9, it has never seen them;
2. apply_lora to its Linear layers, freeze everything else, and fine-tune the
   LoRA parameters alone on 8 and 9, replaying some 0-7 so as not to forget them;
3. save the adapter (PEFT's format) and report its size;
4. merge_and_unload and check that the merged plain MLP predicts the same.

    python examples/digits.py

On a GPU the LoRA layers run the fused Triton kernels; on a CPU the torch
backend (unless TRITON_INTERPRET=1, which interprets the kernels: slow).
"""

import argparse
import copy
import os
import tempfile

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fused_lora import apply_lora, count_parameters, merge_and_unload, save_adapter


class MLP(nn.Module):
    """64 pixels -> 10 digit logits."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 64) -> (batch, 10)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load_data(device: str, seed: int) -> dict[str, torch.Tensor]:
    """Pixels scaled to [0, 1] and labels, split 70 / 30, stratified."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.3, random_state=seed, stratify=digits.target
    )

    def tensor(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=device)

    return dict(
        x_train=tensor(x_train, torch.float32),
        y_train=tensor(y_train, torch.long),
        x_test=tensor(x_test, torch.float32),
        y_test=tensor(y_test, torch.long),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Adam on the parameters that require grad, minibatches of 64, a fixed shuffle order."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            batch = batch.to(x.device)
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test accuracy on the old digits (0-7) and on the new ones (8, 9)."""
    correct = model(x).argmax(-1) == y
    old = y < 8
    return {"0-7": correct[old].float().mean().item(), "8-9": correct[~old].float().mean().item()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="base training on 0-7")
    parser.add_argument("--lora-epochs", type=int, default=40, help="LoRA fine-tuning on 8-9 (+ replay)")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--replay", type=float, default=0.5, help="share of 0-7 training images replayed")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_data(device, args.seed)
    x, y = data["x_train"], data["y_train"]
    old = y < 8

    # 1. The base model never sees an 8 or a 9.
    model = MLP().to(device)
    train(model, x[old], y[old], args.epochs, lr=3e-3, seed=args.seed)
    before = accuracy(model, data["x_test"], data["y_test"])
    print(f"base model, trained on 0-7:  accuracy 0-7 {before['0-7']:.1%}   8-9 {before['8-9']:.1%}")

    # 2. LoRA on every Linear layer; only the adapters train. The new digits plus a
    #    replayed share of the old ones: without replay the model forgets 0-7.
    base = copy.deepcopy(model)
    apply_lora(model, ["fc1", "fc2", "out"], r=args.r, lora_alpha=2 * args.r)
    trainable, total = count_parameters(model)
    generator = torch.Generator().manual_seed(args.seed)
    old_index = old.nonzero().squeeze(1).cpu()
    replay = old_index[torch.randperm(len(old_index), generator=generator)[: int(args.replay * len(old_index))]]
    keep = torch.cat([(~old).nonzero().squeeze(1).cpu(), replay]).to(device)
    train(model, x[keep], y[keep], args.lora_epochs, lr=1e-2, seed=args.seed)
    after = accuracy(model, data["x_test"], data["y_test"])
    print(f"LoRA r={args.r}, fine-tuned on 8-9: accuracy 0-7 {after['0-7']:.1%}   8-9 {after['8-9']:.1%}")
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.1%})")

    # 3. The adapter alone, in PEFT's format (PeftModel.from_pretrained reads it).
    with tempfile.TemporaryDirectory() as path:
        save_adapter(model, path)
        adapter_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        torch.save(base.state_dict(), os.path.join(path, "base.pt"))
        base_bytes = os.path.getsize(os.path.join(path, "base.pt"))
    print(f"adapter on disk: {adapter_bytes / 1024:.1f} KiB (the base model: {base_bytes / 1024:.1f} KiB)")

    # 4. Merge: plain nn.Linear layers again, one GEMM each, same predictions.
    with torch.no_grad():
        logits = model(data["x_test"])
        merge_and_unload(model)
        merged_logits = model(data["x_test"])
    same = bool((logits.argmax(-1) == merged_logits.argmax(-1)).all())
    plain = all(type(m) is nn.Linear for m in (model.fc1, model.fc2, model.out))
    difference = (logits - merged_logits).abs().max().item()
    print(f"merged into plain nn.Linear layers: {plain}; same predictions: {same} (logits differ by {difference:.1e})")
    return dict(
        before=before,
        after=after,
        trainable=trainable,
        total=total,
        adapter_bytes=adapter_bytes,
        base_bytes=base_bytes,
        merged_same=same,
        merged_difference=difference,
        merged_plain=plain,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)  # 64 x 128 matrices: more CPU threads cost more than they give
    main()
