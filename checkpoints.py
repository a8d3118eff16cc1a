"""Finding and downloading GPT-2 checkpoints: a folder, a preset in weights/, the Hugging Face cache, or the hub.

`find_checkpoint(name_or_path)` returns the folder that holds a checkpoint, downloading a preset only when no
local copy exists; `GPT2.from_pretrained` calls it and then reads the folder (gpt2_model.py). `download` writes
each file to `<file>.part`, resumes it with an HTTP Range request after a cut connection, checks it against the
SHA-256 the hub announces, and only then renames it into place.

    python checkpoints.py gpt2-xl gpt2        # download ahead of time into weights/
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gpt2_model import PRESETS, CheckpointError, checkpoint_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HUB_REPOS = {
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


def find_checkpoint(name_or_path, *, weights_dir=None, allow_download=True) -> Path:
    """The folder that holds the checkpoint: a given folder, `<weights_dir>/<preset>`, a Hugging Face cache
    snapshot of the preset, or a fresh download into `<weights_dir>/<preset>`."""
    path = Path(name_or_path)
    if path.is_dir():
        if checkpoint_file(path) is None:
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
        return path
    name = str(name_or_path)
    if name not in PRESETS:
        raise CheckpointError(f"{name!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})")
    folder = Path(weights_dir or WEIGHTS_DIR) / name
    if checkpoint_file(folder) is not None:
        return folder
    cached = _hf_cache_snapshot(name)
    if cached is not None:
        return cached
    if not allow_download:
        raise CheckpointError(
            f"no checkpoint for {name} in {folder} and downloading is off: allow the download, or place "
            f"config.json and model.safetensors from {_hub_url(name, '')} in that folder"
        )
    return download(name, weights_dir)


def _hf_cache_snapshot(name: str) -> Path | None:
    """A snapshot folder of the preset in the standard Hugging Face cache, if one holds a checkpoint."""
    hub = os.environ.get("HF_HUB_CACHE") or Path(
        os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    ) / "hub"
    # The hub renamed gpt2 to openai-community/gpt2; older caches use the old name.
    for repo in (HUB_REPOS[name], name):
        for snapshot in sorted(Path(hub).glob(f"models--{repo.replace('/', '--')}/snapshots/*")):
            if checkpoint_file(snapshot) is not None:
                return snapshot
    return None


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded; the message says how to place the files by hand."""


def _hub_url(name: str, filename: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{HUB_REPOS[name]}/resolve/main/{filename}"


def download(name: str, weights_dir: str | os.PathLike | None = None, *, retries: int = 3) -> Path:
    """Downloads `config.json` and `model.safetensors` of a preset into `<weights_dir>/<name>`; returns the folder.

    Each file goes to `<file>.part` (resumed with an HTTP Range request after a cut connection), is checked
    against the SHA-256 the hub sends for large files, and only then is renamed into place.
    """
    if name not in HUB_REPOS:
        raise ValueError(f"unknown GPT-2 preset {name!r}: choose one of {', '.join(HUB_REPOS)}")
    folder = Path(weights_dir or WEIGHTS_DIR) / name
    folder.mkdir(parents=True, exist_ok=True)
    for filename in ("config.json", "model.safetensors"):
        url = _hub_url(name, filename)
        try:
            _fetch(url, folder / filename, retries=retries)
        except DownloadError as e:
            raise DownloadError(
                f"{e}. Download it by hand from {url} and place it in {folder}, or copy a checkpoint folder "
                f"there (config.json and model.safetensors)"
            ) from None
    return folder


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _expected_sha256(url: str) -> str | None:
    """The SHA-256 the hub announces for a large file: its `X-Linked-Etag` (or `ETag`) header.

    The hub answers a large file with a redirect to a CDN; the hash is on that first answer, so redirects are
    not followed here. Small files get a git hash (40 hex digits) instead, which is not checked.
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "speculative-gpt2"})
    try:
        response = urllib.request.build_opener(_NoRedirect).open(request, timeout=30)
    except urllib.error.HTTPError as e:  # a 3xx answer arrives here since it is not followed
        response = e
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None  # the GET that follows reports the failure, with retries
    for header in ("X-Linked-Etag", "ETag"):
        value = (response.headers.get(header) or "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None


def _fetch(url: str, dest: Path, *, retries: int) -> None:
    part = dest.with_name(dest.name + ".part")
    expected = None
    for attempt in range(retries + 1):
        expected = expected or _expected_sha256(url)
        try:
            if _download_into(url, part):
                break
            error = "the partial file did not match the server's size; it was removed"
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:  # a missing file or a refusal: trying again will not help
                raise DownloadError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            error = str(getattr(e, "reason", None) or e) or e.__class__.__name__
        if attempt == retries:
            raise DownloadError(f"downloading {url} failed after {retries + 1} tries: {error}")
        time.sleep(min(2**attempt, 10) * 0.5)  # then resume from what the .part file holds
    if expected is not None:
        actual = _sha256(part)
        if actual != expected:
            part.unlink()
            raise DownloadError(f"{url}: SHA-256 {actual} does not match the expected {expected}; removed it")
    elif dest.suffix == ".safetensors":
        print(f"warning: {url} announced no SHA-256, so the download is not verified", file=sys.stderr)
    os.replace(part, dest)


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
        with open(part, "ab" if have else "wb") as f, tqdm(
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Download GPT-2 checkpoints from the Hugging Face hub into weights/<name>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("names", nargs="+", choices=list(HUB_REPOS), metavar="NAME", help=", ".join(HUB_REPOS))
    parser.add_argument("--weights-dir", default=str(WEIGHTS_DIR), help="where checkpoints go")
    args = parser.parse_args()
    for preset in args.names:
        try:
            print(download(preset, args.weights_dir))
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
