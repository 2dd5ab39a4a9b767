"""How hard is SynthNORB? The paper's baseline CNN, trained with the paper's preprocessing, tested on
object instances it never saw.

    python benchmarks/synthnorb_difficulty.py [--data DIR] [--epochs 6] [--cameras both|left] [--seed 0]

Renders the full 96x96 SynthNORB into the cache first if --data is not given (about 90 s here). Prints the
test accuracy after every epoch and the final confusion matrix (rows: true class, columns: predicted).
The target band for the generator is 80-98%: neither trivial nor hopeless.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from emcaps.data.smallnorb import SmallNORB
from emcaps.data.synthnorb import ensure_synthnorb
from emcaps.data.transforms import center_crop, preprocess, train_augment
from emcaps.models import BaselineCNN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a smallNORB-format directory (default: render SynthNORB 96x96)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cameras", default="both", choices=["both", "left"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    root = args.data or ensure_synthnorb(size=96, seed=0)
    torch.manual_seed(args.seed)
    x_train, y_train = SmallNORB(root, "train", cameras=args.cameras).tensors()
    x_test, y_test = SmallNORB(root, "test", cameras=args.cameras).tensors()
    x_train = preprocess(x_train)                                  # (N, C, 48, 48), standardised
    x_test = center_crop(preprocess(x_test))                       # (N, C, 32, 32)
    model = BaselineCNN(classes=5, in_channels=x_train.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)

    def test() -> tuple[float, np.ndarray]:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x_test[i:i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)])
        model.train()
        confusion = np.zeros((5, 5), dtype=np.int64)
        np.add.at(confusion, (y_test.numpy(), pred.numpy()), 1)
        return (pred == y_test).float().mean().item(), confusion

    start = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            loss = F.cross_entropy(model(train_augment(x_train[idx], 32, gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc, confusion = test()
        print(f"epoch {epoch}: test accuracy {acc:.4f} ({time.monotonic() - start:.0f} s)", flush=True)
    print("confusion (rows true, columns predicted):")
    print(confusion)


if __name__ == "__main__":
    main()
