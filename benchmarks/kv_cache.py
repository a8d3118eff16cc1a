"""The KV cache, measured: what it stores, what a call pays before its first token, and the memory it holds.

- `--parts speed`: ms per GPT-2 XL pass with the cache stored in float32 against the model's dtype (attention sums in
  float32 either way: `attend` converts one key block at a time), new tokens at positions 16 / 240 / 700, batch x
  new tokens 1x1 (plain decoding), 1x8 (a verification in exact mode) and 8x8; passes alternating, medians.
- `--parts first-token`: time to the first new token of a 10-token prompt with the budget that fills the context
  (a cache of 1024 positions), against the prefill plus one pass: what making the cache costs.
- `--parts memory`: peak resident memory (RSS) of a process that decodes batch 1 and 8 at the full context (prompts of
  1000 tokens, 24 new tokens) with the model loaded (the peak of the load itself, reading a float32 file, is not
  counted), with this checkout's code and with another commit's (`--before`), each in a fresh process.

    python benchmarks/kv_cache.py --target weights/random-gpt2-xl --dtype bfloat16 --before a71da78 \
        --json benchmarks/results/kv-cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Peak RSS of one decoding at the full context, in a fresh process of a version's tree.
MEMORY_WORKER = r"""
import json, sys
import torch
from gpt2_model import GPT2
from speculative import autoregressive_sample

def status(field):  # kB in /proc/self/status, as GiB
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) / 2**20

target_path, dtype, batch = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
model = GPT2.from_pretrained(target_path, dtype=dtype, download=False)
try:
    from speculative_gpt2.packing import pack_linears
    pack_linears(model)
except ImportError:
    model.prepare()
loaded = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here: loading's is not counted
prompts = [[(17 * b + 3 * i) % 50000 for i in range(1000)] for b in range(batch)]
autoregressive_sample(model, prompts if batch > 1 else prompts[0], 24)
print(json.dumps({"loaded_gib": loaded, "peak_gib": status("VmHWM:")}))
"""


def speed(model, repeats: int) -> list[dict]:
    import torch

    from gpt2_model import KVCache

    results = []
    for batch, rows in ((1, 1), (1, 8), (8, 8)):
        for position in (16, 240, 700):
            caches = {str(dtype)[6:]: KVCache(model.config, batch, 1024, dtype, model.device)
                      for dtype in dict.fromkeys((torch.float32, model.dtype))}
            idx = torch.randint(0, model.config.vocab_size, (batch, position + rows),
                                generator=torch.Generator().manual_seed(0))
            times = {name: [] for name in caches}
            with torch.inference_mode():
                for cache in caches.values():  # the prompt's keys and values, once
                    model.forward_at(idx[:, :position], torch.arange(position).expand(batch, position), cache,
                                     KVCache.slots(position))
                positions = torch.arange(position, position + rows).expand(batch, rows)
                span = KVCache.slots(position + rows)
                for _ in range(repeats):  # alternating
                    for name, cache in caches.items():
                        started = time.perf_counter()
                        model.forward_at(idx[:, position:], positions, cache, span)
                        times[name].append(1e3 * (time.perf_counter() - started))
            row = {"batch": batch, "rows": rows, "position": position,
                   **{f"{name}_ms": statistics.median(t[1:]) for name, t in times.items()}}
            results.append(row)
            print(f"batch {batch} x {rows} rows at {position}: " + ", ".join(
                f"cache {name} {statistics.median(t[1:]):.1f} ms" for name, t in times.items()), flush=True)
    return results


def first_token(model, repeats: int) -> dict:
    import torch

    from speculative import autoregressive_sample, speculative_sample
    from speculative_gpt2.drafters import PromptLookupDrafter

    prompt = list(range(1000, 1010))
    budget = model.config.n_positions - len(prompt)
    autoregressive_sample(model, prompt, 4)  # warm-up
    result = {}
    for name, call in (("plain decoding", lambda on: autoregressive_sample(model, prompt, budget, on_tokens=on)),
                       ("prompt lookup, K=4", lambda on: speculative_sample(model, PromptLookupDrafter(), prompt,
                                                                             budget, on_tokens=on))):
        ratios, firsts = [], []
        for _ in range(repeats):
            started, first = time.perf_counter(), []

            def on(new):  # the first token's time, then stop: the rest of the budget is not the question
                first.append(time.perf_counter() - started)
                raise KeyboardInterrupt

            try:
                call(on)
            except KeyboardInterrupt:
                pass
            pass_ms = _pass_ms(model, len(prompt))
            prefill_ms = _prefill_ms(model, prompt)
            firsts.append(1e3 * first[0])
            ratios.append((1e3 * first[0] - prefill_ms) / pass_ms)
        result[name] = {"first_token_ms": statistics.median(firsts), "passes_after_prefill": statistics.median(ratios)}
        print(f"{name}: first token after {statistics.median(firsts):.0f} ms = the prefill + "
              f"{statistics.median(ratios):.2f} passes", flush=True)
    return result


def _pass_ms(model, length: int) -> float:
    import torch

    with torch.inference_mode():
        cache = model.new_cache(max_len=length + 1)
        model(torch.arange(length)[None], cache=cache)
        times = []
        for _ in range(3):
            cache.crop(length)
            started = time.perf_counter()
            model(torch.arange(1)[None], cache=cache)
            times.append(1e3 * (time.perf_counter() - started))
        return statistics.median(times)


def _prefill_ms(model, prompt: list[int]) -> float:
    import torch

    with torch.inference_mode():
        cache = model.new_cache(max_len=len(prompt))
        started = time.perf_counter()
        model(torch.tensor([prompt[:-1]]), cache=cache)
        return 1e3 * (time.perf_counter() - started)


def memory(target: str, dtype: str, before: str | None) -> dict:
    from before_after import extract

    trees = {"after": ROOT} | ({"before": extract(before)} if before else {})
    result = {}
    for batch in (1, 8):
        for version, tree in trees.items():
            run = subprocess.run([sys.executable, "-c", MEMORY_WORKER, str(Path(target).resolve()), dtype, str(batch)],
                                 cwd=tree, check=True, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(tree)))
            got = json.loads(run.stdout.strip().splitlines()[-1])
            result[f"batch {batch}, {version}"] = got
            print(f"batch {batch}, {version}: {got['loaded_gib']:.2f} GiB loaded, peak {got['peak_gib']:.2f} GiB",
                  flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="a checkpoint folder (random weights of the XL shape)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--parts", nargs="+", default=["speed", "first-token", "memory"],
                        choices=["speed", "first-token", "memory"])
    parser.add_argument("--before", default=None, metavar="COMMIT", help="the code to compare peak memory against")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from gpt2_model import GPT2
    from speculative_gpt2.machine import hardware_name
    from speculative_gpt2.packing import pack_linears

    results = {"machine": hardware_name(torch.device("cpu")), "torch": torch.__version__, "dtype": args.dtype,
               "command": " ".join(sys.argv)}
    if {"speed", "first-token"} & set(args.parts):
        model = pack_linears(GPT2.from_pretrained(args.target, dtype=getattr(torch, args.dtype), download=False))
        if "speed" in args.parts:
            results["speed"] = speed(model, args.repeats)
        if "first-token" in args.parts:
            results["first_token"] = first_token(model, 3)
        del model
    if "memory" in args.parts:
        results["memory"] = memory(args.target, args.dtype, args.before)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
