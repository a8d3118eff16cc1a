"""Write a GPT-2 checkpoint of a preset's real shape with random weights, in the hub's layout.

Real GPT-2 weights cannot always be downloaded (an offline machine, CI); checkpoints of the same shapes
make loading, memory and speed measurable anyway. Acceptance rates on them mean nothing for quality.

    python benchmarks/random_checkpoint.py gpt2-xl weights/random-gpt2-xl --seed 0
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpt2_model import PRESETS, GPT2, GPT2Config  # noqa: E402


def write_random_checkpoint(name: str, folder: str | Path, seed: int = 0, std: float = 0.02) -> Path:
    """Writes `config.json` and `model.safetensors` of preset `name` with N(0, std) weights; returns the folder."""
    torch.manual_seed(seed)
    model = GPT2(GPT2Config.from_name(name))
    if std != 0.02:
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.endswith("weight") and p.dim() == 2:
                    p.normal_(0.0, std)
    model.save_pretrained(folder)
    return Path(folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(PRESETS), help="the preset whose shape to copy")
    parser.add_argument("folder", help="where to write config.json and model.safetensors")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--std", type=float, default=0.02, help="std of the weight matrices (default 0.02)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = write_random_checkpoint(args.name, args.folder, seed=args.seed, std=args.std)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
