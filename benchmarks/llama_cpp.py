"""llama.cpp beside this project: the same checkpoints, the same CPU, the same threads, in one run.

llama.cpp is what a CPU user would pick instead. This converts our checkpoints to GGUF with llama.cpp's own
converter (f32, bf16, f16 and q8_0), then alternates rounds of llama.cpp's tools and of a worker process of ours:

- plain decoding: `llama-bench -p 0 -n N` in every GGUF type; ours in --dtype (each model in its fastest weight
  layout, speculative_gpt2/packing.py `lay_out`) and with int8 weights (speculative_gpt2/int8.py);
- speculative decoding with the small draft, K = 4, greedy: `llama-speculative-simple` on the GGUF of --dtype;
  ours with the same draft (and with the draft's weights in int8);
- prompt lookup, K = 4: `llama-lookup`; ours with `PromptLookupDrafter`.

It prints ms per new token (after the prompt) for each, medians over the rounds, and our time over llama.cpp's.
From the pass costs it also projects speculative sampling at the toyllm post's 4.06 tokens per round (a trained
GPT-2 XL / small pair, K = 4), which random weights cannot show: (K x draft pass + verification) / 4.06.
--dtype bfloat16 is the comparison on a CPU that multiplies bfloat16 natively (`lscpu` shows avx512_bf16 or
amx_bf16); elsewhere torch emulates bfloat16 and float32 is the like-for-like one.

llama.cpp is built from the llama-cpp-python sdist, which carries its source (fetched with pip into
bench-out/llama.cpp and built with cmake the first time: about 25 minutes on 2 cores), or taken from --llama-cpp,
a source tree with the tools built in build/bin. Needs cmake and a C++ compiler; the converter runs in this Python
(numpy, safetensors, transformers: `pip install -e ".[bench]"`).

    python benchmarks/llama_cpp.py --target weights/random-gpt2-xl --draft weights/random-gpt2 --dtype float32 \
        --json benchmarks/results/llama-cpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("llama-bench", "llama-speculative-simple", "llama-lookup")
TOYLLM_TOKENS_PER_ROUND = 4.06
GGUF_TYPES = ("f32", "bf16", "f16", "q8_0")
# Our dtype and the GGUF type that holds the same numbers.
OUTTYPE = {"float32": "f32", "bfloat16": "bf16"}
PROMPT = "Alan Turing theorized that computers would one day become"

# Our side, in a process of its own (the models' memory is freed between rounds): prints one JSON object.
WORKER = r"""
import json, statistics, sys, time
import torch
from gpt2_model import GPT2
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.drafters import PromptLookupDrafter
from speculative_gpt2.int8 import quantize_int8
from speculative_gpt2.packing import lay_out
from speculative_gpt2.tokenizer import load_tokenizer
target_path, draft_path, n, K, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
dtype = getattr(torch, sys.argv[7])
torch.set_num_threads(threads)
load = lambda path: GPT2.from_pretrained(path, dtype=dtype, download=False)
target, draft = load(target_path), load(draft_path)
lay_out(draft, 1)
draft_int8 = quantize_int8(load(draft_path))
prompt = load_tokenizer().encode(sys.argv[6])

def ms_per_token(out):
    return 1e3 / out.decode_tokens_per_second

@torch.inference_mode()
def pass_ms(model, rows):
    cache = model.new_cache(max_len=len(prompt) + rows)
    model(torch.tensor([prompt]), cache=cache)
    times = []
    for _ in range(6):
        cache.crop(len(prompt))
        start = time.perf_counter()
        model(torch.arange(rows)[None], cache=cache)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[1:])

# Each run with the target in the layout that its passes run fastest in (1 row plain, K + 1 rows speculative).
runs = {
    "plain": (1, lambda m: autoregressive_sample(target, prompt, m)),
    "speculative, small draft, K=4": (K + 1, lambda m: speculative_sample(target, draft, prompt, m, lookahead=K)),
    "speculative, small draft in int8, K=4": (
        K + 1, lambda m: speculative_sample(target, draft_int8, prompt, m, lookahead=K)),
    "prompt lookup, K=4": (K + 1, lambda m: speculative_sample(target, PromptLookupDrafter(), prompt, m, lookahead=K)),
}
result = {}
for name, (rows, run) in runs.items():
    lay_out(target, rows)
    run(8)  # warm-up, untimed
    result[name] = ms_per_token(run(n))
lay_out(target, 1)
passes = {"target": pass_ms(target, 1)}
lay_out(target, K + 1)
result["passes"] = passes | {"verification": pass_ms(target, K + 1), "draft": pass_ms(draft, 1),
                             "draft in int8": pass_ms(draft_int8, 1)}
del target, draft
target_int8 = quantize_int8(load(target_path))
autoregressive_sample(target_int8, prompt, 8)
result["plain, int8 weights"] = ms_per_token(autoregressive_sample(target_int8, prompt, n))
print(json.dumps(result))
"""


def fetch_and_build(folder: Path) -> Path:
    """llama.cpp's source from the llama-cpp-python sdist in `folder`, with its tools built; returns the source tree."""
    folder.mkdir(parents=True, exist_ok=True)
    sdists = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(folder)], check=True)
        sdists = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    tree = folder / sdists[-1].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not tree.is_dir():
        with tarfile.open(sdists[-1]) as archive:
            archive.extractall(folder, filter="data")
    if not all((tree / "build" / "bin" / tool).exists() for tool in TOOLS):
        print(f"building llama.cpp in {tree} (about 25 minutes on 2 cores) ...", file=sys.stderr, flush=True)
        subprocess.run(["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                        "-DCMAKE_BUILD_TYPE=Release"], cwd=tree, check=True)
        subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                       cwd=tree, check=True)
    return tree


def convert(tree: Path, checkpoint: Path, outtype: str, out: Path) -> Path:
    """The checkpoint as GGUF of `outtype` (bf16, f16, q8_0), made once with llama.cpp's converter. The converter
    wants `n_ctx` in config.json and GPT-2's vocab.json and merges.txt beside the weights (the package's tokenizer
    files are those, under other names): a folder of links and copies gives it that."""
    gguf = out / f"{checkpoint.name}-{outtype}.gguf"
    if gguf.exists():
        return gguf
    staged = out / f"{checkpoint.name}-hf"
    staged.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    (staged / "config.json").write_text(json.dumps(config | {"n_ctx": config.get("n_positions", 1024)}))
    if not (staged / "model.safetensors").exists():
        (staged / "model.safetensors").symlink_to((checkpoint / "model.safetensors").resolve())
    files = ROOT / "speculative_gpt2" / "tokenizer_files"
    shutil.copy(files / "encoder.json", staged / "vocab.json")
    shutil.copy(files / "vocab.bpe", staged / "merges.txt")
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(staged), "--outtype", outtype,
                    "--outfile", str(gguf)], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(tree / "gguf-py")))
    return gguf


def llama_bench_ms(tree: Path, gguf: Path, threads: int, n: int, prompt_rows: int = 0) -> float:
    """ms per token of llama-bench: decoding n tokens (tg), or with prompt_rows one pass of that many tokens (pp)."""
    flags = ["-p", str(prompt_rows), "-n", "0"] if prompt_rows else ["-p", "0", "-n", str(n)]
    out = subprocess.run([str(tree / "build" / "bin" / "llama-bench"), "-m", str(gguf), *flags, "-t", str(threads),
                          "-r", "3", "-o", "json"], check=True, capture_output=True, text=True).stdout
    test = json.loads(out)[0]
    per_second = test["avg_ts"]  # tokens per second
    return prompt_rows * 1e3 / per_second if prompt_rows else 1e3 / per_second


def llama_decode_ms(tree: Path, tool: str, args: list[str], threads: int, n: int) -> float:
    """ms per new token from a speculative tool's "decoded N tokens in S seconds" line."""
    run = subprocess.run([str(tree / "build" / "bin" / tool), *args, "-p", PROMPT, "-n", str(n), "-t", str(threads),
                          "--temp", "0", "-c", "512", "--ignore-eos"], capture_output=True, text=True)
    found = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", run.stdout + run.stderr)
    if found is None:
        raise RuntimeError(f"{tool} printed no timing (status {run.returncode}): {(run.stdout + run.stderr)[-800:]}")
    return 1e3 * float(found[2]) / int(found[1])


def llama_round(tree: Path, ggufs: dict, threads: int, n: int, K: int, outtype: str) -> dict:
    """One round of llama.cpp's tools: plain decoding in every GGUF type, speculative runs in `outtype`."""
    draft_flags = ["--spec-draft-n-max", str(K), "--spec-draft-n-min", "0"]
    target, draft = str(ggufs["target", outtype]), str(ggufs["draft", outtype])
    plain = {f"plain, {t}": llama_bench_ms(tree, ggufs["target", t], threads, n) for t in GGUF_TYPES}
    return plain | {
        "speculative, small draft, K=4": llama_decode_ms(tree, "llama-speculative-simple", [
            "-m", target, "-md", draft, "--spec-type", "draft-simple", *draft_flags], threads, n),
        "prompt lookup, K=4": llama_decode_ms(tree, "llama-lookup", [
            "-m", target, "--spec-draft-n-max", str(K)], threads, n),
        "passes": {"target": plain[f"plain, {outtype}"],
                   "verification": llama_bench_ms(tree, ggufs["target", outtype], threads, n, prompt_rows=K + 1),
                   "draft": llama_bench_ms(tree, ggufs["draft", outtype], threads, n)},
    }


def our_round(target: Path, draft: Path, threads: int, n: int, K: int, dtype: str) -> dict:
    run = subprocess.run([sys.executable, "-c", WORKER, str(target), str(draft), str(n), str(K), str(threads), PROMPT,
                          dtype], cwd=ROOT, check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(run.stdout.strip().splitlines()[-1])


def projected_ms(passes: dict, K: int, draft: str = "draft") -> float:
    """ms per token of speculative sampling at the toyllm pair's acceptance, from the pass costs."""
    return (K * passes[draft] + passes["verification"]) / TOYLLM_TOKENS_PER_ROUND


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, required=True, help="a checkpoint folder (e.g. weights/random-gpt2-xl)")
    parser.add_argument("--draft", type=Path, required=True, help="the draft's checkpoint folder")
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="a llama.cpp source tree with its tools built in build/bin (default: fetched and built "
                        "in bench-out/llama.cpp)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--lookahead", type=int, default=4, help="K for both sides' speculative runs")
    parser.add_argument("--dtype", choices=sorted(OUTTYPE), default="bfloat16",
                        help="our weights' dtype, and the GGUF type of llama.cpp's speculative runs (bfloat16 where "
                        "the CPU runs it natively, float32 elsewhere)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both sides, the order alternating")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from speculative_gpt2.machine import cpu_flags, hardware_name

    tree = args.llama_cpp or fetch_and_build(ROOT / "bench-out" / "llama.cpp")
    gguf_dir = ROOT / "bench-out" / "gguf"
    ggufs = {(role, outtype): convert(tree, folder, outtype, gguf_dir) for role, folder in
             (("target", args.target), ("draft", args.draft)) for outtype in GGUF_TYPES}
    n, K, outtype = args.max_new_tokens, args.lookahead, OUTTYPE[args.dtype]
    sides = {"ours": [], "llama.cpp": []}
    for i in range(args.rounds):
        for side in (("ours", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "ours")):
            got = (our_round(args.target, args.draft, args.threads, n, K, args.dtype) if side == "ours" else
                   llama_round(tree, ggufs, args.threads, n, K, outtype))
            sides[side].append(got)
            print(f"round {i + 1}, {side}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items() if k != "passes"),
                  flush=True)
    median = {side: {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "passes"}
              for side, runs in sides.items()}
    passes = {side: {key: statistics.median(r["passes"][key] for r in runs) for key in runs[0]["passes"]}
              for side, runs in sides.items()}
    flags = " ".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"}))
    print(f"\n{hardware_name(torch.device('cpu')).split(',')[0]} ({flags}), {args.threads} threads, torch "
          f"{torch.__version__}; {n} new tokens after a {len(PROMPT.split())}-word prompt, greedy; ms per new token, "
          f"medians of {args.rounds} rounds")
    print(f"ours in {args.dtype} (int8 weights: products in bfloat16); llama.cpp's speculative runs in {outtype}")
    print("| run | llama.cpp | ours | ours / llama.cpp |\n|---|---:|---:|---:|")
    pairs = [(f"plain, {t}", "plain") for t in GGUF_TYPES if t != "q8_0"] + [("plain, q8_0", "plain, int8 weights"),
             ("speculative, small draft, K=4", "speculative, small draft, K=4"),
             ("speculative, small draft, K=4", "speculative, small draft in int8, K=4"),
             ("prompt lookup, K=4", "prompt lookup, K=4")]
    for theirs, ours in pairs:
        name = theirs if theirs == ours else f"{theirs} / ours: {ours}"
        print(f"| {name} | {median['llama.cpp'][theirs]:.1f} | {median['ours'][ours]:.1f} | "
              f"{median['ours'][ours] / median['llama.cpp'][theirs]:.2f} |")
    for side in sides:
        p = passes[side]
        print(f"{side}: passes (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()) +
              f"; projected at {TOYLLM_TOKENS_PER_ROUND} tokens per round, K={K}: {projected_ms(p, K):.1f} ms per token"
              + (f" ({projected_ms(p, K, 'draft in int8'):.1f} with the draft in int8)" if "draft in int8" in p
                 else ""))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": hardware_name(torch.device("cpu")), "cpu_flags": flags,
                                         "torch": torch.__version__, "threads": args.threads, "max_new_tokens": n,
                                         "dtype": args.dtype,
                                         "lookahead": K, "command": " ".join(sys.argv), "rounds": sides,
                                         "median": median, "passes": passes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
