"""``pyckpt demo``: the main job, end to end, on a generated DataParallel checkpoint."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

HELP = "make a DataParallel checkpoint, show torch failing to load it, load it with pyckpt"
EPILOG = """\
example:
  python -m pyckpt demo                 # in a temporary directory
  python -m pyckpt demo --dir ./demo    # keep the files
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "demo", help=HELP, description=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", help="where to write the demo checkpoint (default: a temporary directory)")
    parser.add_argument("--width", type=int, default=256, help="model width (default: 256)")
    parser.set_defaults(run=run)


def _model(width: int) -> Any:
    import torch
    from torch import nn

    class TinyTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, width)
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, batch_first=True)
                for _ in range(2)
            )
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, 1000, bias=False)
            self.head.weight = self.embed.weight  # tied, as in most language models

    torch.manual_seed(0)
    return TinyTransformer()


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    import pyckpt

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.dir or scratch
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "dataparallel.pt")

        trained = _model(args.width)
        torch.save({"epoch": 7, "model": nn.DataParallel(trained).state_dict()}, path)
        size = os.path.getsize(path) / 2**20
        print(f"1. Saved a DataParallel training checkpoint: {path} ({size:.1f} MiB)")
        print("   keys look like:", ", ".join(list(nn.DataParallel(trained).state_dict())[:2]), "...")

        print("\n2. Plain torch, into the unwrapped model:")
        model = _model(args.width)
        try:
            model.load_state_dict(torch.load(path, weights_only=True)["model"])
            print("   unexpectedly worked")
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            print("   RuntimeError:", lines[0])
            for line in lines[1:3]:
                print("   " + line.strip()[:110] + ("..." if len(line.strip()) > 110 else ""))

        print(f"\n3. pyckpt ({pyckpt.backend()} backend):")
        model = _model(args.width)
        start = time.perf_counter()
        result = pyckpt.load_state_dict(model, path)
        elapsed = time.perf_counter() - start
        print(f"   pyckpt.load_state_dict(model, {os.path.basename(path)!r}) -> {result}  [{elapsed * 1000:.0f} ms]")
        same = all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))
        print(f"   every parameter and buffer equals the trained model's: {same}")
        print(f"   tied weights still tied: {model.head.weight is model.embed.weight}")

        stripped = pyckpt.load(path, strip_prefix="auto")
        print("\n4. pyckpt.load(path, strip_prefix='auto')['model'] keys:", ", ".join(list(stripped["model"])[:2]), "...")
        if not same:
            return 1
    return 0
