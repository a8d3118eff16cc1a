"""Finding and downloading GPT-2 checkpoints: a folder, a preset in the weights folder, the Hugging Face cache, or the hub.

`find_checkpoint(name_or_path)` returns the folder that holds a checkpoint, downloading a preset only when no
local copy exists; `GPT2.from_pretrained` calls it and then reads the folder (gpt2_model.py). `download` writes
each file to `<file>.part`, resumes it with an HTTP Range request after a cut connection, checks it against the
SHA-256 the hub announces, and only then renames it into place; then it records what it verified in
`.verified.json`, which every later load of the preset checks (`check_preset_folder`). Downloads of one preset
take turns on a lock file.

    python -m speculative_gpt2.checkpoints gpt2-xl gpt2        # download ahead of time

The weights folder (`default_weights_dir()`): $SPECULATIVE_GPT2_WEIGHTS if set; else `weights/` of a source checkout
(the folder beside gpt2_model.py, when it has one); else the user's cache, `$XDG_CACHE_HOME/speculative-gpt2`
(default `~/.cache/speculative-gpt2`; a relative XDG_CACHE_HOME is ignored, as the XDG specification says), so
that an installed package works from any directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import http.client
import os
import re
import stat
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from speculative_gpt2.errors import CheckpointError
from speculative_gpt2.files import write_atomically
from speculative_gpt2.state_dict import CONFIG_DEFAULTS, checkpoint_files, describe, read_config
from speculative_gpt2.text import printable

# name: (n_layer, n_head, n_embd); parameter counts with the tied LM head.
PRESETS = {
    "distilgpt2": (6, 12, 768),  # 82M
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 355M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
ENV_WEIGHTS = "SPECULATIVE_GPT2_WEIGHTS"
HUB_REPOS = {
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


def default_weights_dir() -> Path:
    """Where preset checkpoints live by default (see the module docstring); read anew at every call. ValueError,
    naming the variable to set, when the environment names a folder that cannot be found (`~user` unknown)."""
    weights = _environment_path(ENV_WEIGHTS)
    if weights is not None:
        return weights
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "weights").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "weights"
    return _cache_home(f"set {ENV_WEIGHTS} (or pass --weights-dir)") / "speculative-gpt2"


def describe_default_weights_dir() -> str:
    """`default_weights_dir()` as text for a --help, which must show even when the environment is wrong."""
    try:
        return str(default_weights_dir())
    except ValueError as e:
        return f"none, {e}"


def _environment_path(variable: str) -> Path | None:
    """The folder an environment variable names, a leading `~` or `~user` expanded; None when it is unset or
    empty. ValueError naming the variable when the home folder it refers to cannot be found."""
    value = os.environ.get(variable)
    if not value:
        return None
    if not value.startswith("~"):
        return Path(value)
    user = value[1:].split("/")[0]
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # an unknown user, or no HOME and no entry in the password database
        path = None
    if path is None or not path.is_absolute():
        whose = f"user {user!r} has no home folder here" if user else "HOME is unset or not an absolute path"
        raise ValueError(f"{variable}={value!r}: {whose}, so its ~ cannot be expanded: set {variable} to an "
                         f"absolute path{'' if user else ', or set HOME'}")
    return path


def _home(instead: str) -> Path:
    """The user's home folder; ValueError naming what to set when there is none (`instead`: what else would do)."""
    try:
        home = Path.home()
    except RuntimeError:  # no HOME, and no entry in the password database
        home = None
    if home is None or not home.is_absolute():
        raise ValueError(f"cannot find your home folder (HOME is unset or not an absolute path): set HOME to it, or "
                         f"{instead}")
    return home


def _cache_home(instead: str) -> Path:
    """$XDG_CACHE_HOME, else ~/.cache. A relative value is ignored, as the XDG Base Directory specification says:
    it would mean another folder in every working folder."""
    cache = _environment_path("XDG_CACHE_HOME")
    return cache if cache is not None and cache.is_absolute() else _home(instead) / ".cache"


def not_a_checkpoint(name: str, also: tuple[str, ...] = ()) -> str:
    """What to say of a name that is neither a folder nor a preset (`also`: other names the caller accepts)."""
    what = "is a file, not a checkpoint folder" if Path(name).exists() else "does not exist"
    return (f"{name!r} {what}, and it is not a preset: give a checkpoint folder or one of {', '.join(PRESETS)}"
            + "".join(f" or {a}" for a in also))


def find_checkpoint(name_or_path, *, weights_dir=None, allow_download=True) -> Path:
    """The folder that holds a checkpoint.

    The rule: a preset name given as a string (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) always means
    the preset, looked for in `<weights_dir>/<name>`, then in the Hugging Face cache (the snapshot its `refs/main`
    names), then downloaded into `<weights_dir>/<name>` unless `allow_download` is False or HF_HUB_OFFLINE is set.
    The hub ids of the presets (openai-community/gpt2-xl, distilbert/distilgpt2, ...) mean the presets too.
    Anything else is a folder. To load a folder named like a preset, write it as a path: ./gpt2.
    """
    name = str(name_or_path)
    if preset_of(name_or_path):
        return _find_preset(preset_of(name_or_path), weights_dir, allow_download)
    path = Path(name_or_path)
    if not path.is_dir():
        raise CheckpointError(not_a_checkpoint(name))
    if checkpoint_files(path) is None:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin (or a shard index of either) "
                              f"in this folder")
    return path


def local_pair(target: str, draft: str, weights_dir=None) -> tuple[Path, Path, bool] | None:
    """A target's and a draft's folders found on this machine, nothing downloaded: the ones named, else the random
    checkpoints of the presets' shapes that the README's offline route writes (`<weights folder>/random-<name>`).
    Returns (target folder, draft folder, whether they are the random ones), or None when neither pair is here."""
    pairs = [((target, draft), False)]
    if preset_of(target) and preset_of(draft):
        folder = Path(weights_dir or default_weights_dir())
        pairs.append(([folder / f"random-{preset_of(name)}" for name in (target, draft)], True))
    for names, random in pairs:
        try:
            return (*(find_checkpoint(name, weights_dir=weights_dir, allow_download=False) for name in names), random)
        except (CheckpointError, DownloadError):
            continue
    return None


def preset_of(name_or_path) -> str | None:
    """The preset a string names, by its name or its hub id (`openai-community/gpt2` is `gpt2`); None for a path."""
    if not isinstance(name_or_path, str):
        return None
    hub_ids = {repo: preset for preset, repo in HUB_REPOS.items()}
    return name_or_path if name_or_path in PRESETS else hub_ids.get(name_or_path)


def _find_preset(name: str, weights_dir, allow_download: bool) -> Path:
    folder = Path(weights_dir or default_weights_dir()) / name
    if folder.is_dir() and checkpoint_files(folder) is not None:
        return check_preset_folder(folder, name)
    snapshot = hf_cache_snapshot(name)
    if snapshot is not None:
        return snapshot
    if offline() or not allow_download:
        reason = "HF_HUB_OFFLINE is set" if offline() else "downloading is off"
        raise CheckpointError(f"no checkpoint for {name} in {folder} or the Hugging Face cache ({hf_cache_dir()})"
                              f"{_cache_note(name)}, and {reason}: {ways_out(name)}")
    # The same checks as on every later run: a mirror (HF_ENDPOINT) may serve another model under the name.
    return check_preset_folder(download(name, weights_dir), name)


def checkpoint_config(folder: Path, preset: str | None = None) -> dict:
    """The config fields of the checkpoint in `folder`: its config.json, or the preset's when it has none."""
    if (folder / "config.json").exists():
        return read_config(folder / "config.json")
    if preset in PRESETS:
        return preset_config(preset)
    raise ValueError(f"{folder}: no config.json; add one (it says n_layer, n_head, n_embd)")


def preset_config(name: str) -> dict:
    """A preset's config fields (the rest are GPT-2's defaults)."""
    n_layer, n_head, n_embd = PRESETS[name]
    return CONFIG_DEFAULTS | {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}


def check_preset_folder(folder: Path, name: str) -> Path:
    """`folder` if it holds the preset as a download verified it; CheckpointError otherwise.

    Files put in `<weights_dir>/<name>` by hand (random weights, another model) must not pass for the preset: the
    folder must have the preset's shape and `.verified.json`, the record a download writes after checking each
    file against the hash the hub announced, with each file's size and modification time then; a file changed
    since, or a folder without the record, is refused, and the message says how to load it as a plain folder.
    """
    config, want = checkpoint_config(folder, name), preset_config(name)
    as_folder = (f"to load it anyway as an unverified checkpoint, pass its path (--target/--draft {folder}); to get "
                 f"the preset, move it elsewhere and run again")
    if any(config[k] != want[k] for k in ("n_layer", "n_head", "n_embd")):
        raise CheckpointError(f"{folder} holds a model with {describe(config)}, not the preset {name} "
                              f"({describe(want)}): move it elsewhere and pass its folder instead")
    record, why = _read_record(folder)
    if record is None:
        what = f"no record of a verified download ({RECORD})" if why is None else (
            f"no valid record of a verified download ({RECORD} {why})")
        raise CheckpointError(f"{folder} has {what}, so it may not be the official {name} (files placed by hand, "
                              f"random weights): {as_folder}")
    for path in [folder / "config.json", *checkpoint_files(folder)]:
        entry, status = record.get(path.name), path.stat() if path.exists() else None
        if entry is None or status is None or (entry.get("size"), entry.get("mtime_ns")) != (status.st_size,
                                                                                            status.st_mtime_ns):
            raise CheckpointError(f"{path} is not the file whose download was verified ({RECORD} records another "
                                  f"size or time, or none): {as_folder}")
    return folder


RECORD = ".verified.json"
# A record is a few hundred bytes: a file much larger is not one, and is not read.
RECORD_LIMIT = 1 << 20


def _read_record(folder: Path) -> tuple[dict | None, str | None]:
    """The files of `folder`'s verification record ({name: {"size", "mtime_ns", hash kind: hex}}), or None and why
    it is not valid (None when there is no record).

    Only a regular file of at most RECORD_LIMIT bytes is read, opened without following a link and without
    waiting: a link to /dev/zero, a FIFO or a huge sparse file under the name is no record, found at once.
    """
    path = folder / RECORD
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    if (why := _not_a_record_file(status)) is not None:
        return None, why
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    with os.fdopen(fd, "rb") as f:
        why = _not_a_record_file(os.fstat(fd))  # what was opened: the name may have changed since the look
        data = f.read(RECORD_LIMIT + 1) if why is None else b""
    if why is None and len(data) > RECORD_LIMIT:  # it grew since the look
        why = f"is more than a record's {RECORD_LIMIT // 2**20} MiB at most"
    if why is not None:
        return None, why
    try:
        files = json.loads(data)["files"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None, "is not a record: invalid JSON, or no \"files\""
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None, "is not a record: its \"files\" are not a table of files"
    return files, None


def _not_a_record_file(status: os.stat_result) -> str | None:
    """Why a file (its lstat or fstat) cannot be a verification record, or None."""
    mode = status.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link, which is not followed"
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else (
            "a socket" if stat.S_ISSOCK(mode) else "a device")
        return f"is {kind}, not a regular file"
    if status.st_size > RECORD_LIMIT:
        return f"is {status.st_size:,} bytes, more than a record's {RECORD_LIMIT // 2**20} MiB at most"
    return None


def _write_record(folder: Path, name: str, hashes: dict[str, tuple[str, str]]) -> None:
    """Writes what the download verified: each file's hash, and its size and time for cheap checks later."""
    files = {}
    for filename, (kind, digest) in hashes.items():
        status = (folder / filename).stat()
        files[filename] = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, kind: digest}
    record = {"preset": name, "from": _hub_url(name, ""), "files": files}
    write_atomically(folder / RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


@contextlib.contextmanager
def _download_lock(folder: Path):
    """Holds an exclusive lock on `<weights_dir>/.<name>.lock` (beside the folder, which a failed download may
    remove): a second process downloading the same preset waits here, saying so on stderr, then finds the files
    verified."""
    lock = folder.with_name(f".{folder.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise DownloadError(f"cannot create the lock file {lock} for the download ({e.strerror or e}): choose "
                            f"another --weights-dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: say once what this process waits for, rather than seem to hang
            print(f"waiting for another process that is downloading {folder.name} into {str(folder.parent)!r} to "
                  f"finish (it holds the lock file {str(lock)!r}) ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network use, as the Hugging Face libraries read it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def ways_out(name: str) -> str:
    """What a user without the hub can do, in one sentence; the random weights go to weights/, as in the README."""
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    random_folder = f"weights/random-{name}"
    return (f"pass a checkpoint folder in place of {name!r} (--target/--draft FOLDER on the command line): download "
            f"config.json and model.safetensors by hand from {endpoint}/{HUB_REPOS[name]} into a folder, or point "
            f"HF_HOME or HF_HUB_CACHE at a Hugging Face cache that has {HUB_REPOS[name]}"
            + ("" if offline() else ", or set HF_ENDPOINT to a mirror")
            + f"; or try the code on random weights of its shape: python -m speculative_gpt2.random_checkpoint {name} "
            f"{random_folder}, then pass {random_folder}")


def _cache_note(name: str) -> str:
    # Snapshots that were there but not taken: say so, rather than "no checkpoint" in a cache that has some.
    for repo in (HUB_REPOS[name], name):
        snapshots = sorted(p.name for p in (hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*"))
        if snapshots:
            return (f" (it has snapshots {', '.join(snapshots)} of {repo} but no refs/main naming one with weights: "
                    f"pass the snapshot folder you mean)")
    return ""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, where huggingface_hub puts it: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (a `~` expanded in each). ValueError naming the
    variable when one cannot be expanded."""
    hub = _environment_path("HF_HUB_CACHE")
    if hub is not None:
        return hub
    home = _environment_path("HF_HOME")
    instead = "set HF_HUB_CACHE or HF_HOME to the Hugging Face cache"
    return (home if home is not None else _cache_home(instead) / "huggingface") / "hub"


def hf_cache_snapshot(name: str) -> Path | None:
    """The preset's snapshot folder in the Hugging Face cache, if it holds a checkpoint: the one `refs/main` names
    (the revision `transformers` would load), or the only snapshot when there is no `refs/main`."""
    # The hub renamed gpt2 to openai-community/gpt2; older caches use the old name.
    for repo in (HUB_REPOS[name], name):
        repo_dir = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            snapshots = [repo_dir / "snapshots" / ref.read_text().strip()]
        else:  # several snapshots and no ref to choose: none is taken rather than a guess
            snapshots = sorted((repo_dir / "snapshots").glob("*"))
            snapshots = snapshots if len(snapshots) == 1 else []
        for snapshot in snapshots:
            if snapshot.is_dir() and checkpoint_files(snapshot) is not None:
                return snapshot
    return None


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded; the message says how to place the files by hand."""


def _hub_url(name: str, filename: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        raise DownloadError(f"HF_ENDPOINT={endpoint!r} is not an http(s) URL: set it to a mirror such as "
                            f"https://huggingface.co, or unset it")
    return f"{endpoint.rstrip('/')}/{HUB_REPOS[name]}/resolve/main/{filename}"


def download(name: str, weights_dir: str | os.PathLike | None = None, *, retries: int = 3) -> Path:
    """Downloads `config.json` and `model.safetensors` of a preset into `<weights_dir>/<name>`; returns the folder.

    Each file goes to `<file>.part` (resumed with an HTTP Range request after a cut connection), is checked
    against the hash the hub announces (SHA-256 for large files, the git blob SHA-1 for small ones), and only
    then is renamed into place: a file under its final name is always a verified one. A failed download leaves
    no empty folder or empty partial file behind.
    """
    if name not in HUB_REPOS:
        raise ValueError(f"unknown GPT-2 preset {name!r}: choose one of {', '.join(HUB_REPOS)}")
    folder = Path(weights_dir or default_weights_dir()) / name
    if offline():
        raise DownloadError(f"HF_HUB_OFFLINE is set, so {name} is not downloaded: {ways_out(name)}")
    urls = {filename: _hub_url(name, filename) for filename in ("config.json", "model.safetensors")}
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {folder} for the download ({e.strerror or e}): choose another "
                            f"--weights-dir") from None
    with _download_lock(folder):
        if _read_record(folder)[0] is not None and all((folder / f).exists() for f in urls):
            return folder  # another process downloaded it while this one waited: check_preset_folder checks it
        created = not folder.exists()
        folder.mkdir(exist_ok=True)
        try:
            hashes = {filename: _fetch(url, folder / filename, retries=retries) for filename, url in urls.items()}
        except DownloadError as e:
            _remove_empty(folder, created)
            raise DownloadError(f"{e}. What to do: {ways_out(name)}") from None
        if all(hashes.values()):  # a file the server announced no hash for is kept, but not recorded as verified
            _write_record(folder, name, hashes)
    return folder


def _remove_empty(folder: Path, created: bool) -> None:
    for part in folder.glob("*.part"):
        if part.stat().st_size == 0:
            part.unlink()
    if created and not any(folder.iterdir()):
        folder.rmdir()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _expected_hash(url: str) -> tuple[str, str] | None:
    """The hash the hub announces for a file, as ("SHA-256", hex) or ("git SHA-1", hex), or None.

    A large (LFS) file's SHA-256 is its `X-Linked-Etag`: the hub answers it with a redirect to a CDN and the hash
    is on that first answer, so redirects are not followed here. A small file's `ETag` is its git blob SHA-1.
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "speculative-gpt2"})
    try:
        response = urllib.request.build_opener(_NoRedirect).open(request, timeout=30)
    except urllib.error.HTTPError as e:  # a 3xx answer arrives here since it is not followed
        response = e
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
        return None  # the GET that follows reports the failure, with retries
    for header in ("X-Linked-Etag", "ETag"):
        value = (response.headers.get(header) or "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return "SHA-256", value
        if re.fullmatch(r"[0-9a-f]{40}", value):
            return "git SHA-1", value
    return None


def _fetch(url: str, dest: Path, *, retries: int) -> tuple[str, str] | None:
    """Downloads `url` to `dest` through `<dest>.part`, verified; returns the hash checked (None if none was
    announced). A left-over .part whose bytes turn out wrong (a
    hash mismatch after resuming it) is discarded and the file downloaded again from zero, once."""
    part = dest.with_name(dest.name + ".part")
    if part.is_symlink():  # the partial file is opened by name to resume it: a link there is never followed
        raise DownloadError(f"{part} is a symbolic link, which a download does not follow: remove it")
    expected = _expected_hash(url)
    resumed = part.exists() and part.stat().st_size > 0
    _download(url, part, retries)
    expected = expected or _expected_hash(url)  # the first try may have failed for the same reason as the GET
    if expected is not None and _hash(part, expected[0]) != expected[1] and resumed:
        print(f"warning: the partial download {part} was stale (its hash did not match); downloading "
              f"{dest.name} again from the start", file=sys.stderr)
        part.unlink()
        _download(url, part, retries)
    if expected is not None:
        actual = _hash(part, expected[0])
        if actual != expected[1]:
            part.unlink()
            raise DownloadError(f"{url}: {expected[0]} {actual} does not match the expected {expected[1]}; removed it")
    else:
        print(f"warning: {url} announced no hash, so {dest.name} is not verified", file=sys.stderr)
    os.replace(part, dest)
    return expected


def _download(url: str, part: Path, retries: int) -> None:
    """Fills `part` with the whole of `url`, resuming after a cut connection; DownloadError when that fails."""
    for attempt in range(retries + 1):
        try:
            if _download_into(url, part):
                return
            error = "the partial file did not match the server's size; it was removed"
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:  # a missing file or a refusal: trying again will not help
                raise DownloadError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            error = str(getattr(e, "reason", None) or e) or e.__class__.__name__
        if attempt == retries:
            raise DownloadError(f"downloading {url} failed after {retries + 1} tries: {error}")
        time.sleep(min(2**attempt, 10) * 0.5)  # then resume from what the .part file holds


def _download_into(url: str, part: Path) -> bool:
    """Appends the rest of `url` to `part` (all of it if `part` is empty); True when `part` is complete."""
    from tqdm.auto import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "speculative-gpt2"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # Range not satisfiable: the .part file is complete if it has the size the server states.
        complete = (e.headers.get("Content-Range") or "").removeprefix("bytes */") == str(have)
        if not complete:
            part.unlink()
        return complete
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range request: start over
        size = response.headers.get("Content-Length")
        total = have + int(size) if size is not None else None
        # O_NOFOLLOW: a symbolic link planted under the .part name is refused, not followed.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if have else os.O_TRUNC)
        with os.fdopen(os.open(part, flags, 0o666), "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part"),
            file=sys.stderr,
        ) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave a renamed empty file
    if total is not None and part.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)
    return True


def _hash(path: Path, kind: str) -> str:
    """The file's SHA-256, or its git blob SHA-1 (the hub's ETag of a small file): sha1 of "blob <size>\\0" + data."""
    digest = hashlib.sha256() if kind == "SHA-256" else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Download GPT-2 checkpoints from the Hugging Face hub into <weights-dir>/<name>/ (unless it or the "
        "Hugging Face cache already has them: then their folder is printed).",
    )
    parser.add_argument("names", nargs="+", choices=list(HUB_REPOS), metavar="NAME", help=", ".join(HUB_REPOS))
    # The default as text only: a wrong environment is reported when a download needs the folder, not by --help.
    parser.add_argument("--weights-dir", default=None, help=f"where checkpoints go (default: "
                        f"{printable(describe_default_weights_dir()).replace('%', '%%')}; ${ENV_WEIGHTS} sets it)")
    args = parser.parse_args()

    for preset in args.names:
        try:  # a copy already in weights/ or the Hugging Face cache is reported, not downloaded again
            print(printable(str(find_checkpoint(preset, weights_dir=args.weights_dir))))
        except (DownloadError, ValueError, OSError) as e:  # one line, never a traceback
            print(f"speculative_gpt2.checkpoints: error: {printable(str(e))}", file=sys.stderr)
            sys.exit(2)
