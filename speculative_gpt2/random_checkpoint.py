"""GPT-2 models with random weights: checkpoints of a preset's real shape, and tiny pairs for tests and examples.

Real GPT-2 weights cannot always be downloaded (an offline machine, CI); checkpoints of the same shapes
make loading, memory and speed measurable anyway. Acceptance rates on them mean nothing for quality.

    python -m speculative_gpt2.random_checkpoint gpt2-xl weights/random-gpt2-xl
    python -m speculative_gpt2.random_checkpoint gpt2 weights/random-gpt2
    python -m speculative_gpt2.random_checkpoint gpt2-xl weights/small-xl --n-layer 2   # a quick, small stand-in
    python -m speculative_gpt2.random_checkpoint gpt2-xl weights/looping-gpt2-xl --scaled-residuals  # a target that loops
"""

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

from gpt2_model import PRESETS, GPT2, GPT2Config
from speculative_gpt2.state_dict import CHECKPOINT_FILES


def random_model(config: GPT2Config, seed: int, scale: float = 1.0, scaled_residuals: bool = False) -> GPT2:
    """A GPT-2 in eval mode with N(0, 0.02 * scale) weight matrices. A scale of 5 gives peaked logits, so that
    greedy choices are rarely near-ties and greedy text is not one token repeated.

    `scaled_residuals` divides the projections that write into the residual stream (attn.c_proj, mlp.c_proj) by
    sqrt(2 * n_layer), GPT-2's own initialization (Radford et al. 2019, section 2.3). Measured on the GPT-2 small
    and XL shapes: greedy text is then runs of one token, up to 40 long, a target that loops (what prompt lookup is
    for; docs/bench-drafters.md)."""
    torch.manual_seed(seed)
    model = GPT2(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(scale)
                if scaled_residuals and name.endswith("c_proj.weight"):
                    p.div_((2 * config.n_layer) ** 0.5)
    return model


def noisy_copy(model: GPT2, noise: float, seed: int) -> GPT2:
    """The same model with Gaussian noise of `noise` times each tensor's std: a draft that agrees sometimes."""
    copy = GPT2(model.config).eval()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    return copy


def tiny_pair(n_positions: int = 256) -> tuple[GPT2, GPT2]:
    """A tiny target (2 layers, 64 wide, the real vocabulary) and a noisy copy of it as the draft: every origin
    of a token shows up, and greedy outputs match, in milliseconds. The text is gibberish."""
    target = random_model(GPT2Config(n_positions=n_positions, n_embd=64, n_layer=2, n_head=4), seed=0, scale=5)
    return target, noisy_copy(target, noise=0.08, seed=1)


def write_random_checkpoint(name: str, folder: str | Path, seed: int = 0, std: float = 0.02,
                            n_layer: int | None = None, scaled_residuals: bool = False, progress: bool = False) -> Path:
    """Writes `config.json` and `model.safetensors` of preset `name` (with `n_layer` layers instead of the preset's,
    if given) with N(0, std) weights (see `random_model` for `scaled_residuals`); returns the folder. A failed write
    leaves no new folder behind. `progress`: a bar of the weights made, then a line for the write, on stderr."""
    config = GPT2Config.from_name(name)
    if n_layer is not None:
        config = dataclasses.replace(config, n_layer=n_layer)
    with _weights_bar(config, progress):
        model = random_model(config, seed=seed, scale=std / 0.02, scaled_residuals=scaled_residuals)
    size = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head is stored once
    if progress:
        print(f"Writing {Path(folder) / 'model.safetensors'} ({size / 2**30:.1f} GiB) ...", file=sys.stderr)
    model.save_pretrained(folder)
    return Path(folder)


@contextlib.contextmanager
def _weights_bar(config: GPT2Config, show: bool):
    """A bar that moves as the model's parameters are made (each registration follows the previous one's random
    draws); no bar when `show` is False or stderr is not a terminal."""
    if not show:
        yield
        return
    from tqdm.auto import tqdm

    with torch.device("meta"):  # the parameters' count, with no memory and no random draws
        total = sum(p.numel() for p in GPT2(config).parameters())
    with tqdm(total=total, desc="Making random weights", unit="weight", unit_scale=True,
              file=sys.stderr, leave=False, disable=None) as bar:
        seen = set()

        def made(module, name, parameter) -> None:  # a hook that returned a value would replace the parameter
            if parameter is not None and id(parameter) not in seen:  # the tied head registers wte's weight again
                seen.add(id(parameter))
                bar.update(parameter.numel() if parameter.device.type != "meta" else 0)

        hook = torch.nn.modules.module.register_module_parameter_registration_hook(made)
        try:
            yield
        finally:
            hook.remove()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m speculative_gpt2.random_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(PRESETS), help="the preset whose shape to copy")
    parser.add_argument("folder", help="where to write config.json and model.safetensors")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--std", type=float, default=0.02, help="std of the weight matrices (default 0.02)")
    parser.add_argument("--n-layer", type=int, default=None,
                        help="layers, instead of the preset's (a small, quick stand-in of the same width)")
    parser.add_argument("--scaled-residuals", action="store_true",
                        help="GPT-2's own initialization: attn.c_proj and mlp.c_proj divided by sqrt(2 * n_layer); "
                        "greedy text then repeats a token (a target that loops)")
    parser.add_argument("--force", action="store_true",
                        help="replace the checkpoint the folder already holds (without it, such a folder is refused: "
                        "it may hold downloaded weights)")
    args = parser.parse_args()
    if args.n_layer is not None and args.n_layer < 1:
        parser.error(f"argument --n-layer: invalid value {args.n_layer}: must be >= 1")
    held = next((name for name in (*CHECKPOINT_FILES, *(f"{n}.index.json" for n in CHECKPOINT_FILES), "config.json")
                 if (Path(args.folder) / name).exists()), None)
    if held is not None and not args.force:  # a download's weights would be hidden or replaced by random ones
        print(f"{parser.prog}: error: {args.folder} already holds a checkpoint ({held}): write to a new folder, or add "
              f"--force to replace it", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    try:
        out = write_random_checkpoint(args.name, args.folder, seed=args.seed, std=args.std, n_layer=args.n_layer,
                                      scaled_residuals=args.scaled_residuals, progress=True)
    except (OSError, ValueError, ImportError) as e:  # one line; the folder it made is gone
        sys.exit(f"{parser.prog}: error: cannot write {args.folder}: {e}")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
