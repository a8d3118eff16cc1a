"""Reading and writing checkpoint folders: config.json, the tensors in one file or in shards, checked first.

The model (gpt2_model.py) calls `read_config` and `read_state_dict` from `GPT2.from_pretrained`, and
`write_checkpoint` from `save_pretrained`. A config here is any object with GPT-2's fields (`GPT2Config`).

The checkpoint stores the four projection weights as Conv1D, [in, out]; nn.Linear wants [out, in]: they are
transposed once, here, on the way in and on the way out.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from speculative_gpt2.checks import check_integer
from speculative_gpt2.errors import CheckpointError, OutOfMemory, is_out_of_memory
from speculative_gpt2.files import write_atomically

CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
# What the model reads of a config.json, and the values Hugging Face's GPT2Config gives those it lacks (GPT-2
# small's); other keys are ignored.
CONFIG_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                   "layer_norm_epsilon": 1e-5}


def read_config(path: str | os.PathLike) -> dict:
    """The fields of a Hugging Face `config.json` that GPT-2 uses (defaults for those it lacks), refusing the
    variants this model does not implement (types and ranges: GPT2Config). Raises ValueError naming the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the config must be a JSON object, got {type(raw).__name__}")
    try:
        _check_variant(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return {k: raw.get(k, default) for k, default in CONFIG_DEFAULTS.items()}


def _check_variant(raw: dict) -> None:
    # Variants this from-scratch model does not implement must not load silently with wrong maths.
    if raw.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type {raw['model_type']!r} is not GPT-2: this loads GPT-2 checkpoints only")
    n_inner, n_embd = raw.get("n_inner"), raw.get("n_embd", 768)
    if n_inner is not None:
        try:
            check_integer("n_inner", n_inner)
            if isinstance(n_embd, int) and n_inner != 4 * n_embd:
                raise ValueError
        except ValueError:
            raise ValueError(f"n_inner={n_inner!r} is not supported (only null or 4 * n_embd)") from None
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if raw.get(flag, False) is not False:
            raise ValueError(f"{flag}={raw[flag]!r} is not supported by this GPT-2 (only false)")
    for flag in ("scale_attn_weights", "tie_word_embeddings"):
        if raw.get(flag, True) is not True:
            raise ValueError(f"{flag}={raw[flag]!r} is not supported by this GPT-2 (only true: "
                             + ("scaled attention)" if flag == "scale_attn_weights" else "the LM head is wte)"))
    if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"activation_function={raw['activation_function']!r} is not supported "
                         f"(only GPT-2's tanh GELU)")


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The checkpoint files in `folder`: one file, or the shards its index lists (`save_pretrained` shards large
    models as `model-00001-of-00002.safetensors` ... with a `model.safetensors.index.json`); None if it has none."""
    for filename in CHECKPOINT_FILES:
        if (folder / filename).is_file():
            return [folder / filename]
        index = folder / f"{filename}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                shards = []
            if not shards or not all(isinstance(f, str) and Path(f).name == f for f in shards):
                raise CheckpointError(f"{index}: not a shard index (a JSON object whose weight_map maps tensor "
                                      f"names to files in this folder)") from None
            missing = [f for f in shards if not (folder / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists {missing[0]}, which is not in the folder "
                                      f"({len(missing)} of {len(shards)} shards missing)")
            return [folder / f for f in shards]
    return None


def read_state_dict(folder: Path, config, *, dtype=torch.float32, device="cpu") -> dict:
    """Our state dict from a checkpoint folder, checked against `config`: every tensor present once, shaped right.

    Both layouts found in the wild load: the hub's (no prefix, with `attn.bias` mask buffers) and
    `save_pretrained`'s (a `transformer.` prefix, no buffers), in one file or in shards. The files' tensor names,
    shapes and dtypes are checked first, from their headers, before any weight is read or any memory is taken;
    then tensors are read one at a time from a memory map and converted on the way, so no second full copy of
    the model is built. An `lm_head.weight` must equal `wte.weight` (GPT-2 ties them): an untied head is refused,
    never dropped.
    """
    files = checkpoint_files(folder)
    where, lm_head = check_tensors(folder, files, config)
    state = {}
    for path in files:
        with _TensorFile(path) as tensors:
            for key, raw_key in where[path]:
                t = tensors.get(raw_key)
                t = t.t() if _is_conv1d(key) else t
                # Always a copy of our own: a tensor left on the memory map would keep the whole file's pages
                # mapped (gigabytes of resident memory with GPT-2 XL, whose wte needs no conversion in float32).
                state[key] = _allocate(path, config, dtype, device, lambda: torch.empty(t.shape, dtype=dtype,
                                                                                       device=device).copy_(t))
    if lm_head is not None:
        with _TensorFile(lm_head[0]) as tensors:
            head = tensors.get(lm_head[1])
            if not torch.equal(head.to(device, dtype), state["wte.weight"]):
                raise CheckpointError(f"{lm_head[0]}: lm_head.weight differs from wte.weight (an untied LM head): "
                                      f"not supported, this GPT-2 ties its LM head to the token embedding")
    return state


def check_tensors(folder: Path, files: list[Path], config) -> tuple[dict, tuple | None]:
    """Checks the checkpoint's tensor names, shapes and dtypes against `config`, from the file headers only (no
    weights read, no model built: a config that claims 10,000 layers over a 1-layer file is refused at once).
    Returns {file: [(our key, the file's key)]} and where an `lm_head.weight` is, if anywhere."""
    expected = expected_shapes(config)
    where, names, lm_head = {}, {}, None
    for path in files:
        where[path] = []
        with _TensorFile(path) as tensors:
            for raw_key in tensors.keys():
                key = raw_key.removeprefix("transformer.")
                if key.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # causal-mask buffers: nothing to load
                if key in names:
                    raise CheckpointError(f"{path}: holds {key!r} twice (as {names[key]!r} and {raw_key!r}): "
                                          f"which one is meant is unclear")
                names[key] = raw_key
                if key != "lm_head.weight" and key not in expected:
                    raise CheckpointError(f"{path}: unexpected tensor {raw_key!r} for {describe(config)}"
                                          + _layer_note(names, config))
                shape, not_floating = tensors.header(raw_key)
                if not_floating:  # int8, bool, complex ...: converting them to weights would be silently wrong
                    raise CheckpointError(f"{path}: tensor {raw_key!r} is {not_floating}, not floating point: GPT-2 "
                                          f"weights are float32, float16 or bfloat16; this is not a GPT-2 "
                                          f"checkpoint (or a quantized one, which this model cannot load)")
                shape = shape[::-1] if _is_conv1d(key) else shape
                want = expected.get(key, expected["wte.weight"])  # a tied lm_head has wte's shape
                if shape != want:
                    raise CheckpointError(f"{path}: tensor {raw_key!r} has shape {list(shape)}, expected "
                                          f"{list(want)} for {describe(config)}")
                if key == "lm_head.weight":
                    lm_head = (path, raw_key)
                else:
                    where[path].append((key, raw_key))
    missing = sorted(set(expected) - set(names))
    if missing:
        place = files[0] if len(files) == 1 else f"{folder} (shards)"
        raise CheckpointError(f"{place}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
                              + _layer_note(names, config))
    return where, lm_head


def _layer_note(names: dict, config) -> str:
    # Whole layers missing or extra: say so in the config's terms, the likely mistake.
    layers = {int(m.group(1)) for k in names if (m := re.match(r"h\.(\d+)\.", k))}
    if layers and len(layers) != config.n_layer:
        return (f": the file holds {len(layers)} layer{'s' if len(layers) != 1 else ''}, config.json says "
                f"n_layer={config.n_layer}")
    return ""


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a GPT-2 with this config (Linear weights [out, in]), computed from the config
    alone: no module is built."""
    C = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.n_positions, C),
              "ln_f.weight": (C,), "ln_f.bias": (C,)}
    layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (3 * C, C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (4 * C, C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (C, 4 * C),
             "mlp.c_proj.bias": (C,)}
    for i in range(config.n_layer):
        shapes |= {f"h.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def _allocate(path: Path, config, dtype, device, make):
    try:
        return make()
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(_out_of_memory_message(path, config, dtype, device)) from None


def _out_of_memory_message(path: Path, config, dtype, device) -> str:
    return (f"out of memory while loading {path} ({describe(config)}) as {str(dtype).removeprefix('torch.')} on "
            f"{device}: the file is not at fault; free memory, or use a smaller model or dtype (bfloat16 needs "
            f"half of float32)")


def describe(config) -> str:
    """A config (a GPT2Config or a dict of its fields) in one line."""
    config = SimpleNamespace(**config) if isinstance(config, dict) else config
    return f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, vocab={config.vocab_size}"


class _TensorFile:
    """`keys()` and `get(key)` over a safetensors file (memory-mapped) or a pytorch_model.bin. A file that cannot be
    read, or that would run code when unpickled, or that is not a dict of named tensors, raises CheckpointError
    with one line saying which, whatever way safetensors or torch.load report it."""

    def __init__(self, path: Path):
        self.path, self._file = path, None

    def __enter__(self):
        try:
            open(self.path, "rb").close()
        except OSError as e:  # permissions, a folder in its place: not the file's content, so no advice to delete it
            raise CheckpointError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            self._file = self._read(lambda: safe_open(str(self.path), framework="pt"))
            self._keys, self._get = self._file.keys, self._file.get_tensor
        else:
            try:
                state = self._read(lambda: torch.load(self.path, map_location="cpu", weights_only=True, mmap=True))
            except _Corrupt:  # files in torch's legacy (pre-1.6) format cannot be memory-mapped
                state = self._read(lambda: torch.load(self.path, map_location="cpu", weights_only=True))
            if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in state.items())):
                raise CheckpointError(f"{self.path}: does not hold a dict of named tensors (got "
                                      f"{type(state).__name__}): not a GPT-2 state dict")
            self._keys, self._get = state.keys, state.__getitem__
        return self

    def __exit__(self, *exc):
        self._keys = self._get = self._file = None

    def keys(self):
        return self._read(self._keys)

    def get(self, key: str) -> torch.Tensor:
        return self._read(lambda: self._get(key))

    def header(self, key: str) -> tuple[tuple[int, ...], str | None]:
        """The tensor's shape, and its dtype's name if it is not floating point (else None); no data read."""
        if self._file is not None:
            info = self._read(lambda: self._file.get_slice(key))
            kind = info.get_dtype()  # "F32", "BF16", "F8_E4M3", "I64", "BOOL", "C64" ...
            return tuple(info.get_shape()), None if kind.startswith(("F", "BF")) else kind
        t = self.get(key)  # a memory map or a loaded dict: no copy
        return tuple(t.shape), None if t.dtype.is_floating_point else str(t.dtype).removeprefix("torch.")

    def _read(self, read):
        try:
            return read()
        except (MemoryError, RuntimeError, OSError) as e:
            if not is_out_of_memory(e):
                raise _Corrupt(self.path, e) from None
            raise OutOfMemory(f"out of memory while reading {self.path}: the file is not at fault; free memory, "
                              f"or use a smaller model or dtype (bfloat16 needs half of float32)") from None
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise _Corrupt(self.path, e) from None
            raise CheckpointError(f"{self.path}: refused: unpickling it would run code (it holds objects other than "
                                  f"tensors); use a safetensors checkpoint") from None
        except Exception as e:  # truncation and corruption surface as many exception types
            raise _Corrupt(self.path, e) from None


class _Corrupt(CheckpointError):
    def __init__(self, path: Path, error: Exception):
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        super().__init__(f"{path}: cannot read the checkpoint, it may be truncated or corrupt ({detail}); delete it "
                         f"and download it again")


def write_checkpoint(folder: str | os.PathLike, state: dict, config: dict) -> None:
    """Writes `config.json` and `model.safetensors` in the hub's layout (no prefix, Conv1D [in, out]), each file
    whole or not at all; a folder this call made is removed again if writing fails."""
    from safetensors.torch import save_file

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        tensors = {k: (v.t() if _is_conv1d(k) else v).contiguous().cpu() for k, v in state.items()}
        write_atomically(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new"} | config
        write_atomically(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    except BaseException:
        if created:  # a folder this call made holds nothing of the user's: a failed write leaves no trace
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _is_conv1d(key: str) -> bool:
    # The checkpoint stores these four projections as Conv1D weights, [in, out]; nn.Linear wants [out, in].
    return re.fullmatch(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", key) is not None
