"""Before a base model is downloaded from the Hugging Face hub: is there room for it where the cache lives?

A hub id that is not fully in the local cache is fetched by whatever loads it first (`from_pretrained` in
`swft-lite train`, `snapshot_download` in `merge --base` / `chat` / `eval`). gpt-oss-20b is ~14 GB (MXFP4) or ~42 GB
(bf16); a disk that fills half way leaves a partial download and a traceback. So every command that may download a
base calls `check_download_space` first: it asks the hub for the repo's file sizes (`HfApi.model_info(...,
files_metadata=True)`; the token, if any, is huggingface_hub's own: HF_TOKEN or the saved login, never printed here),
adds up the files that would be fetched and are not in the cache already, and compares that with the free space of
`huggingface_hub.constants.HF_HUB_CACHE` (HF_HUB_CACHE / HF_HOME), keeping a margin. Too little: one `Error:` line
(`DiskSpaceError`). Offline (HF_HUB_OFFLINE=1) or the hub unreachable: nothing is said here; the loader's own
failure, and its one `Error:` line, stay as they were.

Imports nothing of swft-lite but its errors.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from swft_lite.errors import DiskSpaceError

# What a base load fetches: config and generation config, the safetensors index and shards, tokenizer files and the
# chat template (`merge.resolve_model_dir` passes these as snapshot_download's allow_patterns).
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")
MARGIN_FRACTION = 0.05   # free space must exceed the download by 5 % ...
MARGIN_BYTES = 10**9     # ... and by at least 1 GB (the cache writes each file to a temporary name first)


@dataclass
class DownloadPlan:
    """What fetching `repo_id` would add to the cache: the files not in it yet and their size."""

    repo_id: str
    cache_dir: Path
    files: dict[str, int] = field(default_factory=dict)   # to download: name -> bytes
    cached: list[str] = field(default_factory=list)        # already in the cache, not counted

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    @property
    def need(self) -> int:
        """Bytes of free space asked for: the download plus the margin (nothing when there is nothing to fetch)."""
        return 0 if not self.files else self.bytes + max(MARGIN_BYTES, int(self.bytes * MARGIN_FRACTION))


def is_hub_id(ref: str) -> bool:
    """owner/name that is not a folder on this machine."""
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists()


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes",
                                                                                                  "on")


def free_bytes(folder: Path) -> int:
    """Free space of the disk that holds `folder` (its nearest existing parent: the cache may not exist yet)."""
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def wanted(name: str, patterns) -> bool:
    """Whether a file of the repo is fetched: from_pretrained, and merge's snapshot_download (ignore_patterns */*),
    read only the repo's root (not, for openai/gpt-oss-20b, original/ or metal/)."""
    if "/" in name:
        return False
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _in_cache(repo_id: str, sibling, commit: str | None, root: Path) -> bool:
    """The file is in the cache at the revision that would be fetched, or its content (blob) is there already, in
    which case huggingface_hub links it instead of downloading it."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    if isinstance(try_to_load_from_cache(repo_id, sibling.rfilename, cache_dir=str(root), revision=commit or "main"),
                  str):
        return True
    blob = (sibling.lfs.sha256 if getattr(sibling, "lfs", None) else None) or getattr(sibling, "blob_id", None)
    return bool(blob) and (root / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs" / blob).is_file()


def download_plan(repo_id: str, *, revision: str | None = None, patterns=MODEL_PATTERNS) -> DownloadPlan | None:
    """The files of `repo_id` a load would fetch and that are not cached, with their sizes from the hub. None when
    the hub cannot be asked (offline, unreachable, no access, no such repo): the loader then fails as it always did."""
    if _offline():
        return None
    from huggingface_hub import HfApi, constants

    try:  # the timeout huggingface_hub gives its own metadata requests (HF_HUB_ETAG_TIMEOUT, 10 s by default)
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception:  # noqa: BLE001 - no answer from the hub: not ours to report (the loader's error says why)
        return None
    root = cache_dir()
    plan = DownloadPlan(repo_id, root)
    for sibling in info.siblings or []:
        if not wanted(sibling.rfilename, patterns):
            continue
        if _in_cache(repo_id, sibling, getattr(info, "sha", None), root):
            plan.cached.append(sibling.rfilename)
        else:
            plan.files[sibling.rfilename] = int(sibling.size or 0)
    return plan


def check_download_space(ref: str, flag: str, *, revision: str | None = None, patterns=MODEL_PATTERNS,
                         echo=None) -> DownloadPlan | None:
    """Refuse (DiskSpaceError) a hub id whose download does not fit the free space of the Hugging Face cache.
    A folder, an offline machine or an unreachable hub: nothing checked (None). `flag` names the option the model
    came from (--model, --base), for the advice."""
    if not is_hub_id(ref):
        return None
    plan = download_plan(ref, revision=revision, patterns=patterns)
    if plan is None or not plan.files:
        return plan
    free = free_bytes(plan.cache_dir)
    if free < plan.need:
        raise DiskSpaceError(
            f"{flag} {ref}: not enough disk space to download it: {len(plan.files)} file(s) not in the Hugging Face "
            f"cache need {plan.bytes / 1e9:.1f} GB (+{(plan.need - plan.bytes) / 1e9:.1f} GB margin) and "
            f"{plan.cache_dir} has {free / 1e9:.1f} GB free. Nothing was downloaded. Free space there, set "
            f"HF_HUB_CACHE (or HF_HOME) to a folder on a larger disk, or pass a local folder holding the model "
            f"({flag} PATH)")
    if echo is not None:
        echo(f"download: {ref}: {len(plan.files)} file(s), {plan.bytes / 1e9:.1f} GB, into {plan.cache_dir} "
             f"({free / 1e9:.1f} GB free)")
    return plan
