"""The released models by name, downloaded from the Hugging Face Hub on first use (`huggingface_hub`).

`MODEL_ZOO` is the one table of hub repositories and file names. A named model lives in the conventional layout
(`output/pretrained_models/`, SPEC section 1) under the working directory, or under `root`:

- `fetch(name)` returns its local path, downloading the files that are missing (a file already there is never
  touched: no network call at all when everything is in place).
- `resolve_model_argument(path_or_name)` is what `--model_path` / `--load-from` go through: an existing path as it
  is, a named model (or its conventional path) fetched first, and its released image size.
- `fetch_conventional(path)` fetches a named model when `path` is its conventional place and it is missing there,
  so the default T5, VAE and HED folders download themselves too.

Downloads are checked: the size of every file and its checksum against the hub's (sha256 of LFS files, the git
blob id of the others); a mismatch deletes the file and raises `CorruptDownload`. A transfer that breaks resumes
from where it stopped (huggingface_hub asks for the rest with a Range request, up to five times); a file left
unfinished by a killed run is downloaded again from its start (huggingface_hub keeps no partial file), the complete
ones are kept. `HF_HUB_OFFLINE=1`, no network or a hub that refuses gives `ModelNotAvailable`, which names every
missing file, where it goes and where to get it by hand. `HF_ENDPOINT` points huggingface_hub at a mirror.
"""
import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from diffusion.release import PRETRAINED_DIR, RELEASED_T5_DIR, RELEASED_VAE_DIR
from diffusion.utils.names import lookup

PIXART_REPO = "PixArt-alpha/PixArt-alpha"  # tools/download.py and the README of the reference implementation
_T5_FILES = ("config.json", "special_tokens_map.json", "spiece.model", "tokenizer_config.json",
             "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


@dataclass(frozen=True)
class NamedModel:
    """A released model: `files` of hub repository `repo_id` (at `revision`) go to `local_dir/<file>`; `path` is
    what a script is given (the file, or the folder the files make up)."""
    name: str
    what: str
    repo_id: str
    files: tuple
    local_dir: str
    path: str
    download: str  # size on the hub, for --list and the README
    image_size: int = None  # transformers and ControlNets: the size they were released for
    revision: str = "main"
    also_at: tuple = ()  # other conventional places that mean this model (the reference's T5 parent folder)


def _single(name, what, repo_id, filename, download, image_size=None):
    return NamedModel(name, what, repo_id, (filename,), PRETRAINED_DIR, f"{PRETRAINED_DIR}/{filename}", download,
                      image_size)


MODEL_ZOO = {model.name: model for model in (
    _single("PixArt-XL-2-256x256", "PixArt", PIXART_REPO, "PixArt-XL-2-256x256.pth", "2.45 GB", 256),
    _single("PixArt-XL-2-SAM-256x256", "PixArt trained on SA-1B", PIXART_REPO,
            "PixArt-XL-2-SAM-256x256.pth", "about 2.45 GB", 256),
    _single("PixArt-XL-2-512x512", "PixArt", PIXART_REPO, "PixArt-XL-2-512x512.pth", "2.45 GB", 512),
    _single("PixArt-XL-2-1024-MS", "PixArtMS, multi-scale", PIXART_REPO, "PixArt-XL-2-1024-MS.pth",
            "2.47 GB", 1024),
    NamedModel("PixArt-LCM-XL-2-1024-MS", "PixArtMS distilled into an LCM (4 steps, no guidance): the transformer "
               "and scheduler of its diffusers pipeline", "PixArt-alpha/PixArt-LCM-XL-2-1024-MS",
               ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors"),
               f"{PRETRAINED_DIR}/PixArt-LCM-XL-2-1024-MS", f"{PRETRAINED_DIR}/PixArt-LCM-XL-2-1024-MS", "2.45 GB",
               1024),
    _single("PixArt-XL-2-512-ControlNet", "ControlNet-HED over PixArt", "PixArt-alpha/PixArt-ControlNet",
            "PixArt-XL-2-512-ControlNet.pth", "3.63 GB", 512),
    _single("PixArt-XL-2-1024-ControlNet", "ControlNet-HED over PixArtMS", "PixArt-alpha/PixArt-ControlNet",
            "PixArt-XL-2-1024-ControlNet.pth", "3.65 GB", 1024),
    _single("ControlNetHED", "the HED edge detector the ControlNets were trained on", PIXART_REPO,
            "ControlNetHED.pth", "29.4 MB"),
    NamedModel("t5-v1_1-xxl", "T5 v1.1 XXL text encoder and tokenizer", PIXART_REPO,
               tuple(f"t5-v1_1-xxl/{f}" for f in _T5_FILES), RELEASED_T5_DIR, f"{RELEASED_T5_DIR}/t5-v1_1-xxl",
               "19.1 GB", also_at=(RELEASED_T5_DIR,)),
    NamedModel("sd-vae-ft-ema", "the SD VAE (AutoencoderKL)", PIXART_REPO,
               ("sd-vae-ft-ema/config.json", "sd-vae-ft-ema/diffusion_pytorch_model.bin"), PRETRAINED_DIR,
               RELEASED_VAE_DIR, "335 MB"),
)}


_LOCK_FILE = ".download.lock"


class ModelNotAvailable(FileNotFoundError):
    """A named model is not (completely) on disk and cannot be downloaded now."""


class CorruptDownload(ModelNotAvailable):
    """A downloaded file whose size or checksum is not the hub's (it has been deleted)."""


def get(name):
    """The NamedModel called `name` (a KeyError naming the closest names otherwise)."""
    return lookup(MODEL_ZOO, name, "named model")


def local_path(model, root=None):
    """Where the named `model` (a NamedModel) lives under `root` (default: the working directory)."""
    return Path(root or ".") / model.path


def missing_files(model, root=None):
    """The files of `model` not on disk under `root`, as repository paths."""
    base = Path(root or ".") / model.local_dir
    return [f for f in model.files if not (base / f).is_file()]


def named_model_at(path_or_name, root=None):
    """The NamedModel that `path_or_name` means, or None: its name, or one of its conventional paths under `root`."""
    text = str(path_or_name)
    if text in MODEL_ZOO:
        return MODEL_ZOO[text]
    wanted = _absolute(Path(text))
    for model in MODEL_ZOO.values():
        places = (model.path, *model.also_at)
        if any(_absolute(Path(root or ".") / place) == wanted for place in places):
            return model
    return None


def fetch(name, root=None):
    """The local path of the named model `name` under `root`, after downloading whatever files are missing."""
    model = get(name)
    missing = missing_files(model, root)
    if missing:
        base = Path(root or ".") / model.local_dir
        try:  # asked before anything is written: offline or without network nothing is
            remote, commit = _remote_files(model, missing)
        except _HubUnavailable as err:
            raise _not_available(model, missing, base, str(err)) from None
        with _download_lock(base):  # processes started together (DDP ranks) download once: the others then find it
            missing = missing_files(model, root)
            if missing:
                _download(model, missing, base, remote, commit)
    return local_path(model, root)


def fetch_conventional(path, root=None):
    """`path` itself, unless it is the conventional place of a named model that is missing there, or there only in
    part (a download that stopped): then that model is fetched and its path returned (a T5 parent folder gives the
    T5 folder). A folder there that holds files of its own (a T5 converted by hand, say) is left as it is."""
    model = named_model_at(path, root)
    if model is None or not missing_files(model, root):
        return path
    base = Path(root or ".") / model.local_dir
    folder = Path(root or ".") / model.path
    if folder.is_dir():
        own = {p.relative_to(base).as_posix() for p in folder.rglob("*")
               if p.is_file() and ".cache" not in p.parts and p.name != _LOCK_FILE}  # download bookkeeping
        if own - set(model.files):
            return path
    return fetch(model.name, root)


def resolve_model_argument(path_or_name, image_size=None, root=None):
    """(local path, image size) for a `--model_path` / `--load-from` value: an existing file or folder as it is; a
    named model, or its conventional path, fetched first. The image size is `image_size`, else the named model's
    released one (None for other paths); a named model given another size is refused."""
    model = named_model_at(path_or_name, root)
    if model is None:
        return path_or_name, image_size
    if image_size is not None and model.image_size is not None and image_size != model.image_size:
        raise ValueError(f"{model.name} is a {model.image_size} px model; --image_size {image_size} does not fit it "
                         "(leave it out)")
    return fetch(model.name, root), image_size or model.image_size


def verify(name, root=None):
    """Check every local file of the named model against the hub (size and checksum); returns the mismatches as
    'FILE: reason' lines (missing files included), [] when all match. Needs the network."""
    model = get(name)
    base = Path(root or ".") / model.local_dir
    try:
        remote, _ = _remote_files(model, model.files)
    except _HubUnavailable as err:
        raise ModelNotAvailable(f"cannot verify {model.name} against {model.repo_id}: {err}") from None
    problems = [f"{base / f}: missing" for f in missing_files(model, root)]
    return problems + [p for f in model.files if (base / f).is_file() and (p := _mismatch(base / f, remote[f]))]


# ---------------------------------------------------------------- downloading

@contextlib.contextmanager
def _download_lock(folder):
    """An exclusive lock on `folder` among the processes of this machine (flock; none where fcntl is missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: concurrent downloads into one folder are not guarded
        yield
        return
    with open(folder / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _absolute(path):
    return Path(path).expanduser().absolute().resolve()


def _transport_errors():
    """The errors of huggingface_hub's HTTP client (httpx2 today), from the bases of its HfHubHTTPError."""
    from huggingface_hub.errors import HfHubHTTPError
    return tuple(base for base in HfHubHTTPError.__mro__[1:] if issubclass(base, Exception) and base not in
                 (OSError, Exception)) + (OSError,)


def _not_available(model, missing, base, reason):
    from huggingface_hub import hf_hub_url
    lines = [f"{model.name} ({model.what}) is not on disk and cannot be downloaded: {reason}.",
             f"Missing ({len(missing)} of {len(model.files)} files):"]
    lines += [f"  {_absolute(base / f)}  <-  {hf_hub_url(model.repo_id, f, revision=model.revision)}" for f in missing]
    lines.append(f"Download them on a machine with network access (python tools/download.py {model.name}) and copy "
                 "them to the paths above, or run again with network access (without HF_HUB_OFFLINE=1).")
    return ModelNotAvailable("\n".join(lines))


class _HubUnavailable(Exception):
    """The hub cannot tell us about a repository now (offline, no network, refused, files missing there)."""


def _remote_files(model, wanted):
    """{repository path: RepoSibling with size and checksums} of `wanted`, and the commit they were listed at."""
    from huggingface_hub import HfApi, is_offline_mode
    if is_offline_mode():
        raise _HubUnavailable("HF_HUB_OFFLINE is set")
    try:  # one listing, no retries: without network this fails at once
        info = HfApi().model_info(model.repo_id, revision=model.revision, files_metadata=True)
    except _transport_errors() as err:
        raise _HubUnavailable(f"the hub could not be asked for its files ({type(err).__name__}: {err})") from None
    remote = {sibling.rfilename: sibling for sibling in info.siblings or ()}
    absent = [f for f in wanted if f not in remote]
    if absent:
        raise _HubUnavailable(f"{model.repo_id} at {info.sha} has no {absent}")
    return remote, info.sha


def _download(model, missing, base, remote, commit):
    """Download the `missing` files of `model` into `base` at `commit`, then check them against `remote`."""
    from huggingface_hub import hf_hub_download, snapshot_download
    print(f"downloading {model.name} ({model.download}) from {model.repo_id} into {base}: {', '.join(missing)}",
          flush=True)
    try:  # at the listed commit, so every file comes from the same one
        if len(model.files) == 1:
            hf_hub_download(model.repo_id, missing[0], revision=commit, local_dir=base)
        else:  # exactly the missing files: a file already there (placed by hand, say) is never replaced
            snapshot_download(model.repo_id, revision=commit, allow_patterns=list(missing), local_dir=base)
    except _transport_errors() as err:
        done = [f for f in missing if (base / f).is_file()]
        raise _not_available(model, [f for f in missing if f not in done], base,
                             f"the download failed ({type(err).__name__}: {err}); complete files are kept") from None
    for filename in missing:
        path = base / filename
        problem = _mismatch(path, remote[filename])
        if problem:
            path.unlink(missing_ok=True)
            raise CorruptDownload(f"{problem}: the download of {model.repo_id}/{filename} is corrupt and was deleted; "
                                  "run again to download it anew")


def _mismatch(path, sibling):
    """Why the file at `path` is not the hub's `sibling` ('PATH: ...'), or None when its size and checksum match:
    sha256 for LFS files, the git blob id (sha1 of 'blob SIZE\\0' + content) for the others."""
    size = path.stat().st_size
    expected_size = sibling.lfs.size if sibling.lfs else sibling.size
    if expected_size is not None and size != expected_size:
        return f"{path}: {size} bytes, the hub has {expected_size}"
    if sibling.lfs:
        digest, expected = hashlib.sha256(), sibling.lfs.sha256
    elif sibling.blob_id:
        digest, expected = hashlib.sha1(f"blob {size}\0".encode()), sibling.blob_id
    else:
        return None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        kind = "sha256" if sibling.lfs else "git blob id"
        return f"{path}: {kind} {digest.hexdigest()}, the hub has {expected}"
    return None
