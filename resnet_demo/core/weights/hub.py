"""A model from the Hugging Face Hub by name (``timm/resnet50.a1_in1k``, ``microsoft/resnet-50``), downloaded through
``huggingface_hub`` into its cache and opened like an upload.

Only :func:`open_from_hub` touches the network, and only when called: the page and the command line call it when
a person asks for a model id (``--hub MODEL_ID``, the page's Hub box; ``--no-hub`` turns the box off). Before any
download the repository's metadata is read: the weights file chosen (``model.safetensors`` first; a pickle such as
``pytorch_model.bin`` only when there is no safetensors file, and read with ``weights_only``), its size checked
against the reader's bound and the parameter count the Hub reports against the reader's. The download itself
stops as soon as more bytes arrive than the metadata said: a server that lies about a file's size costs at most
one chunk beyond it. The file is then read by the one bounded reader, as any upload is, so a pickle that would run
code never runs.

The process may be in the Hub's offline mode (the app sets ``HF_HUB_OFFLINE=1`` so that no library phones home):
a call here lifts it for its own requests only, then restores it. ``HF_ENDPOINT``, ``HF_HOME`` and
``HF_HUB_CACHE`` are read when the call is made. Requests are anonymous: only public models are read.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import WeightsError
from .cards import ModelCard
from .load import open_checkpoint
from .opening import MAX_JSON_BYTES, read_json
from .reader import MAX_BYTES, MAX_PARAMS, _size

__all__ = ["HubError", "choose_weights", "normalise_model_id", "open_from_hub"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96}$")
_PICKLES = (".bin", ".pth", ".pt", ".ckpt")
_ONLINE_LOCK = threading.Lock()


class HubError(WeightsError):
    """The Hub could not give a model: unknown repository, no weights file, a file over a bound, no network."""


def normalise_model_id(text: str) -> str:
    """``owner/name`` from what a person types: a model id, ``hf-hub:owner/name`` (timm's spelling) or the model's
    page address.

    Raises:
        HubError: not a model id.
    """
    value = str(text).strip()
    value = re.sub(r"^(?:hf-hub:|https?://(?:www\.)?huggingface\.co/)", "", value).strip("/")
    if not _ID.match(value) or ".." in value or "--" in value:
        raise HubError(f"{text!r:.120} is not a Hugging Face model id (owner/name, e.g. timm/resnet50.a1_in1k)")
    return value


def _file_size(sibling: Any) -> int | None:
    lfs = getattr(sibling, "lfs", None)
    size = getattr(lfs, "size", None) if lfs is not None else None
    return size if size is not None else getattr(sibling, "size", None)


def choose_weights(files: Sequence[str]) -> str | None:
    """The weights file of a repository's top-level files: ``model.safetensors``, else its one other
    ``.safetensors`` file, else ``pytorch_model.bin``, else its one ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``;
    ``None`` when there is none (or several, and nothing says which)."""
    top = [f for f in files if "/" not in f]
    safetensors = [f for f in top if f.endswith(".safetensors")]
    if "model.safetensors" in safetensors:
        return "model.safetensors"
    if len(safetensors) == 1:
        return safetensors[0]
    if safetensors:
        return None
    if "pytorch_model.bin" in top:
        return "pytorch_model.bin"
    pickles = [f for f in top if f.endswith(_PICKLES)]
    return pickles[0] if len(pickles) == 1 else None


@contextlib.contextmanager
def _online() -> Iterator[None]:
    """The Hub's offline mode lifted for this call's requests (one call at a time), then put back as it was."""
    from huggingface_hub import constants

    with _ONLINE_LOCK:
        was = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = False
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = was


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


class _TooLarge(Exception):
    pass


def _bounded_progress(limit: int) -> type:
    """A progress bar for ``hf_hub_download`` that stops the download once more than ``limit`` bytes arrived."""
    from huggingface_hub.utils import tqdm

    class Bounded(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # counting, not drawing
            super().__init__(*args, **kwargs)
            self.received = 0

        def update(self, n: float | None = 1) -> bool | None:
            self.received += int(n or 0)
            if self.received > limit:
                raise _TooLarge(self.received)
            return super().update(n)

    return Bounded


def _same_size_in_headers(repo: str, name: str, size: int, revision: str, endpoint: str | None) -> None:
    """The size the file's own headers give must be the metadata's: a Xet-backed download writes as many bytes as
    the headers say, so a larger number there would bypass the bound checked above."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        said = get_hf_file_metadata(hf_hub_url(repo, name, revision=revision, endpoint=endpoint), token=False).size
    except Exception as exc:  # noqa: BLE001 - HTTP errors, httpx's transport errors, timeouts
        raise HubError(f"{repo}'s {name} could not be reached ({type(exc).__name__})") from None
    if said != size:
        raise HubError(f"{repo}'s {name} is {_size(size)} according to the Hub's listing but "
                       f"{_size(said or 0)} according to its download headers; it was not downloaded")


def open_from_hub(
    model_id: str,
    *,
    revision: str | None = None,
    class_names: Sequence[str] | None = None,
    max_bytes: int = MAX_BYTES,
    max_params: int = MAX_PARAMS,
) -> tuple[nn.Module, ModelCard]:
    """Download ``model_id`` from the Hub (or take it from the cache) and open it as an upload is opened.

    Args:
        model_id: ``owner/name``, ``hf-hub:owner/name`` or the model page's address.
        revision: a branch, tag or commit; the default branch by default.
        class_names: one per class, instead of the repository's labels.
        max_bytes: the largest weights file fetched (the reader's bound by default).
        max_params: the most parameters the Hub may report for it (the reader's bound by default).

    Returns:
        ``(model, card)`` on the CPU in eval mode; the card names the repository and the commit.

    Raises:
        HubError: one sentence: not a model id, no such repository or revision, no network, no weights file,
            sizes over a bound or a file larger than the Hub said.
        WeightsError: the file is refused by the reader or fits no supported network (as for an upload).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo = normalise_model_id(model_id)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    with _online():
        try:
            info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True, token=False)
        except RepositoryNotFoundError:
            raise HubError(f"there is no public model {repo} on the Hub") from None
        except RevisionNotFoundError:
            raise HubError(f"the model {repo} has no revision {revision!r} on the Hub") from None
        except Exception as exc:  # noqa: BLE001 - HTTP errors, offline mode, httpx's transport errors, timeouts
            raise HubError(f"the Hub could not be reached for {repo} ({type(exc).__name__})") from None
        sizes = {s.rfilename: _file_size(s) for s in info.siblings or []}
        name = choose_weights(list(sizes))
        if name is None:
            found = ", ".join(sorted(sizes)[:8]) or "no files"
            raise HubError(f"{repo} on the Hub has no weights file this page reads (model.safetensors, "
                           f"pytorch_model.bin …); it holds {found}")
        size = sizes[name]
        if size is None:
            raise HubError(f"the Hub does not say how large {repo}'s {name} is, so it was not downloaded")
        if size > max_bytes:
            raise HubError(f"{repo}'s {name} is {_size(size)} according to the Hub, over the limit of "
                           f"{_size(max_bytes)} for a checkpoint; it was not downloaded")
        params = getattr(getattr(info, "safetensors", None), "total", None)
        if isinstance(params, int) and params > max_params:
            raise HubError(f"{repo} has {params:,} parameters according to the Hub, over the limit of "
                           f"{max_params:,}; it was not downloaded")
        common = {"revision": info.sha, "cache_dir": _cache_dir(), "endpoint": endpoint, "token": False}
        _same_size_in_headers(repo, name, size, info.sha, endpoint)

        def fetch(filename: str, limit: int) -> str:
            try:
                return hf_hub_download(repo, filename, tqdm_class=_bounded_progress(limit), **common)
            except _TooLarge:
                raise HubError(f"{repo}'s {filename} is larger than the {_size(limit)} the Hub said it is; the "
                               "download was stopped") from None
            except EntryNotFoundError:
                raise HubError(f"{repo}'s {filename} is listed by the Hub but could not be downloaded") from None
            except Exception as exc:  # noqa: BLE001 - HTTP errors, httpx's transport errors, timeouts, a full disk
                raise HubError(f"{repo}'s {filename} could not be downloaded ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None

        configs: dict[str, dict[str, Any]] = {}
        for extra in ("config.json", "preprocessor_config.json"):
            if extra in sizes and (sizes[extra] or 0) <= MAX_JSON_BYTES:
                configs[extra] = read_json(fetch(extra, MAX_JSON_BYTES), f"{repo}'s {extra}")
        path = Path(fetch(name, size))
    if path.stat().st_size != size:
        raise HubError(f"{repo}'s {name} is {_size(path.stat().st_size)}, not the {_size(size)} the Hub said")
    model, card = open_checkpoint(path, source=f"{repo} ({name})", class_names=class_names,
                                  config=configs.get("config.json"),
                                  preprocessor=configs.get("preprocessor_config.json"))
    card.name = repo if revision is None else f"{repo}@{revision}"
    card.training["hub"] = {"model_id": repo, "revision": info.sha, "file": name}
    return model, card
