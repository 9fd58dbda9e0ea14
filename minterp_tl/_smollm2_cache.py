"""The SmolLM2 weight cache: the model de-quantised from its GGUF file, as safetensors with its HF config
and tokenizer, so that the next process skips the de-quantisation (see :func:`minterp_tl.models.load_model`).

An entry is a folder ``<cache>/smollm2-135m-<hash of its key>/`` holding ``config.json``,
``tokenizer.json`` (the backend tokenizer), ``tokenizer_init.json`` (the tokenizer's class and constructor
arguments), ``model.safetensors`` (tied tensors once) and ``manifest.json`` (the key, each file's sha256
and the tied weights). The key is what the content depends on: the GGUF file (size, mtime, a hash of its
first MiB), the dtype and the versions of torch, transformers and gguf.

Written into a temporary folder beside it and renamed into place (the commit); read only once the
folder is a real folder holding exactly the files its manifest lists, none a link, each with its sha256.
Anything else raises :class:`Unusable`, which the loader reports with a warning before it rebuilds.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from minterp_tl._cache import (
    atomic_write_bytes,
    default_cache_dir,
    file_sha256,
    package_version,
    read_buffer,
    read_no_follow,
    safetensors_views,
)
from minterp_tl._files import _umask
from minterp_tl._store_format import fsync_dir

_ENTRY_FORMAT = 1
_MANIFEST = "manifest.json"
_WEIGHTS = "model.safetensors"
_TOKENIZER = "tokenizer.json"  # the backend tokenizer (``tokenizers`` serialisation)
_TOKENIZER_INIT = "tokenizer_init.json"  # the tokenizer's class and constructor arguments
_STALE_S = 3600.0  # a writer's temporary folder older than this was left by a killed process
_LEFTOVER = re.compile(r"\.smollm2-135m-[0-9a-f]{20}\.[0-9a-z_]+\.(?:tmp|old)")
REBUILD = "Loading the GGUF file again and rewriting the cache."


def smollm2_key(gguf: Path, dtype: torch.dtype) -> dict[str, Any]:
    """What the converted model depends on: the GGUF file (size, mtime and a hash of its first MiB,
    which holds the header), the dtype, and the versions of the libraries that convert it."""
    st = gguf.stat()
    with open(gguf, "rb") as fh:
        head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
    return {
        "format": _ENTRY_FORMAT,
        "gguf": gguf.name,
        "gguf_bytes": st.st_size,
        "gguf_mtime_ns": st.st_mtime_ns,
        "gguf_head_sha256": head,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "gguf_reader": package_version("gguf"),
    }


def entry_path(key: dict[str, Any]) -> Path:
    """The cache folder of the entry written for ``key``."""
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()
    return default_cache_dir() / f"smollm2-135m-{digest}"


class Unusable(Exception):
    """A cache entry that cannot be used; the message says why."""


def entry_files(entry: Path, key: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``{file name: sha256}`` and the tied weights ``{name not stored: name stored}`` from the manifest of
    the cache folder ``entry``, which must be a real folder holding exactly the files its manifest lists,
    written for ``key``; else :class:`Unusable`."""
    if entry.is_symlink():
        raise Unusable("it is a symbolic link (links are not followed)")
    if not entry.is_dir():
        raise Unusable("it is not a folder")
    try:
        manifest = json.loads(read_no_follow(entry / _MANIFEST))
    except (OSError, ValueError) as err:  # a partial folder, a link, not JSON
        raise Unusable(f"its manifest cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict):
        raise Unusable("its manifest is malformed")
    files, tied = manifest.get("files"), manifest.get("tied")
    if not (
        isinstance(files, dict)
        and _WEIGHTS in files
        and isinstance(tied, dict)
        and all(isinstance(n, str) and n == Path(n).name and n not in (_MANIFEST, "..") for n in files)
        and all(isinstance(v, str) for v in [*files.values(), *tied, *tied.values()])
    ):
        raise Unusable("its manifest is malformed")
    if manifest.get("key") != key:
        raise Unusable("its manifest names another GGUF file, dtype or library versions")
    if sorted(os.listdir(entry)) != sorted([*files, _MANIFEST]):
        raise Unusable(f"it holds other files than its manifest lists ({sorted(files)})")
    return files, tied


def check_file(path: Path, sha256: str) -> None:
    """Raise :class:`Unusable` unless ``path`` is a regular file (not a link) with this sha256."""
    try:
        actual = file_sha256(path)
    except OSError as err:
        reason = err.strerror or str(err)
        raise Unusable(f"{path.name} cannot be read ({reason}; links are not followed)") from None
    if actual != sha256:
        raise Unusable(f"{path.name} does not match its hash (the file was altered or corrupted)")


def _tokenizer_from_entry(entry: Path, gguf: Path) -> Any:
    """The tokenizer, built as the GGUF loader builds it: its class with the same constructor arguments,
    given the converted backend tokenizer (so that TransformerLens sees the same tokenizer, down to its
    ``name_or_path``, the GGUF folder)."""
    import transformers

    spec = json.loads(read_no_follow(entry / _TOKENIZER_INIT))
    cls = getattr(transformers, str(spec.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        raise Unusable(f"{_TOKENIZER_INIT} names no tokenizer class of transformers")
    # tokenizer_file (checked just before, not a link) is not recorded in init_kwargs, like the GGUF file
    kwargs = {**spec["init_kwargs"], "name_or_path": str(gguf.parent)}
    return cls(tokenizer_file=str(entry / _TOKENIZER), **kwargs)


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    """transformers' switch that skips the random initialisation of a new model (the weights are given)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers: initialised, then overwritten (slower, the same result)
        return contextlib.nullcontext()
    return no_init_weights()


def _hf_model_from_weights(
    entry: Path, weights: Callable[[], dict[str, torch.Tensor]], tied: dict[str, str], dtype: torch.dtype
) -> Any:
    """The HF model built from the cached config (no random initialisation), then given ``weights()`` (no
    copy) and its tied weights tied again: about 0.3 s, against 0.7 s for ``from_pretrained`` and a
    first forward pass slowed by reading weights from a memory map."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(entry), local_files_only=True)
    with _no_init_weights():
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = hf_model.load_state_dict(weights(), strict=False, assign=True)
    if unexpected or set(missing) != set(tied):
        raise Unusable(f"its weights do not fit its config (missing {missing[:3]}, extra {unexpected[:3]})")
    hf_model.tie_weights()
    if any(hf_model.get_parameter(a) is not hf_model.get_parameter(b) for a, b in tied.items()):
        raise Unusable("its tied weights could not be tied again")
    return hf_model


def load_entry(
    entry: Path, key: dict[str, Any], gguf: Path, dtype: torch.dtype
) -> tuple[Any, Any, Callable[[], Optional[str]]]:
    """The HF model and tokenizer from the cache folder ``entry``, and a call that says what is wrong with
    the weights (``None``: they match their sha256). A thread reads the weights (540 MB, once) while the
    tokenizer and the empty model are built, then hashes them while the model is given views of the same
    bytes and booted (file reads and hashlib release the GIL): the call waits for the hash. Raises
    :class:`Unusable` (or the loaders' errors) when the entry cannot be used."""
    files, tied = entry_files(entry, key)
    for name, sha256 in files.items():
        if name != _WEIGHTS:
            check_file(entry / name, sha256)
    pool = ThreadPoolExecutor(max_workers=1)  # one thread: the read, then the hash
    reading = pool.submit(read_buffer, entry / _WEIGHTS)
    digest = pool.submit(lambda: hashlib.sha256(memoryview(reading.result())).hexdigest())
    pool.shutdown(wait=False)  # the thread ends with the hash

    def weights_problem() -> Optional[str]:
        try:
            actual = digest.result()
        except OSError as err:
            return f"{_WEIGHTS} cannot be read ({err.strerror or err}; links are not followed)"
        if actual != files[_WEIGHTS]:
            return f"{_WEIGHTS} does not match its hash (the file was altered or corrupted)"
        return None

    try:
        tokenizer = _tokenizer_from_entry(entry, gguf)
        hf_model = _hf_model_from_weights(entry, lambda: safetensors_views(reading.result()), tied, dtype)
    except Exception:
        if (problem := weights_problem()) is not None:  # the cause to report
            raise Unusable(problem) from None
        raise
    hf_model.name_or_path = hf_model.config.name_or_path = str(gguf.parent)  # as loaded from there
    return hf_model, tokenizer, weights_problem


def write_entry(entry: Path, key: dict[str, Any], hf_model: Any, tokenizer: Any) -> None:
    """Write the HF config, tokenizer files and weights (tied tensors once) to a temporary folder beside
    ``entry``, with a manifest of their sha256, then rename it to ``entry`` (replacing a damaged one).
    Raises (``OSError``, ...) when the cache cannot be written."""
    from safetensors.torch import save

    start = time.perf_counter()
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(entry.parent)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        spec = {"class": type(tokenizer).__name__, "init_kwargs": tokenizer.init_kwargs}  # name_or_path reset
        atomic_write_bytes(tmp / _TOKENIZER_INIT, json.dumps(spec, indent=1).encode())  # TypeError: not JSON
        atomic_write_bytes(tmp / _TOKENIZER, tokenizer.backend_tokenizer.to_str().encode())
        config = copy.deepcopy(hf_model.config)
        if hasattr(config, "quantization_config"):  # the weights are plain floats now
            del config.quantization_config
        config.save_pretrained(str(tmp))
        first: dict[int, str] = {}
        state, tied = {}, {}
        for name, tensor in hf_model.state_dict().items():  # a tied tensor once, under its first name
            if tensor.data_ptr() in first:
                tied[name] = first[tensor.data_ptr()]
            else:
                first[tensor.data_ptr()] = name
                state[name] = tensor.detach().contiguous()
        data = save(state, metadata={"format": "pt"})
        atomic_write_bytes(tmp / _WEIGHTS, data)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.name != _WEIGHTS}
        files[_WEIGHTS] = hashlib.sha256(data).hexdigest()
        del data
        fd = os.open(tmp / "config.json", os.O_RDONLY | os.O_NOFOLLOW)  # the config writer does not fsync
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - start
        manifest = {"format": _ENTRY_FORMAT, "key": key, "files": files, "tied": tied, "seconds": seconds}
        atomic_write_bytes(tmp / _MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        old = None
        if os.path.lexists(entry):  # a damaged entry: move it aside, then put ours in its place
            old = entry.with_name(f".{entry.name}.{secrets.token_hex(8)}.old")
            os.rename(entry, old)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # not another writer's entry: a real failure
                raise
        fsync_dir(entry.parent)  # the rename is the commit
        if old is not None:
            _remove(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete ``path``: a link or file itself, a folder with its content (links inside not followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_leftovers(directory: Path) -> None:
    """Delete the temporary folders of killed writers (this module's names only, over an hour old)."""
    now = time.time()
    for item in os.scandir(directory):
        try:
            if _LEFTOVER.fullmatch(item.name) and now - item.stat(follow_symlinks=False).st_mtime > _STALE_S:
                _remove(Path(item.path))
        except OSError:
            pass


__all__ = [
    "REBUILD",
    "Unusable",
    "check_file",
    "entry_files",
    "entry_path",
    "load_entry",
    "smollm2_key",
    "write_entry",
]
