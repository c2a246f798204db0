"""Named models download on first use: against a real HTTP server on 127.0.0.1 that serves a small fake hub
(tests/hub_server.py), with HF_ENDPOINT pointing at it and HF_HOME in tmp_path. huggingface_hub runs unpatched in a
subprocess, as it does for a user: a download, a transfer resumed after the server cut it, a corrupt file caught,
offline mode with and without a local copy, and the scripts taking a name."""
import os
import subprocess
import sys

import pytest

from diffusion.model_zoo import MODEL_ZOO, fetch_conventional, named_model_at, resolve_model_argument
from tests.conftest import REPO
from tests.hub_server import FakeHub

TOOL = REPO / "tools" / "download.py"
PIXART = "PixArt-alpha/PixArt-alpha"
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes (and so resumes) in chunks of this size


def fake_repos():
    """The files of the named models the tests fetch, with random bytes of test sizes under the hub's names."""
    return {PIXART: {"PixArt-XL-2-256x256.pth": os.urandom(64 * 1024),
                     "PixArt-XL-2-512x512.pth": os.urandom(CHUNK + 2 * 1024 * 1024),
                     "sd-vae-ft-ema/config.json": b'{"_class_name": "AutoencoderKL"}\n',
                     "sd-vae-ft-ema/diffusion_pytorch_model.bin": os.urandom(32 * 1024),
                     "README.md": b"fake hub\n"}}


def run(args, tmp_path, endpoint, offline=False, script=TOOL):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def pretrained(tmp_path, name):
    return tmp_path / MODEL_ZOO[name].path


@pytest.fixture
def hub():
    with FakeHub(fake_repos()) as server:
        yield server


def test_a_named_model_downloads_into_the_conventional_layout_and_a_complete_one_asks_nothing(tmp_path, hub):
    done = run(["PixArt-XL-2-256x256", "sd-vae-ft-ema"], tmp_path, hub.url)
    assert done.returncode == 0, done.stderr
    files = hub.repos[PIXART]
    assert pretrained(tmp_path, "PixArt-XL-2-256x256").read_bytes() == files["PixArt-XL-2-256x256.pth"]
    vae = pretrained(tmp_path, "sd-vae-ft-ema")
    assert (vae / "config.json").read_bytes() == files["sd-vae-ft-ema/config.json"]
    assert (vae / "diffusion_pytorch_model.bin").read_bytes() == files["sd-vae-ft-ema/diffusion_pytorch_model.bin"]
    asked = {path for _, path, _ in hub.requests}
    assert f"api/models/{PIXART}/revision/main" in asked  # sizes and checksums, and the commit to fetch
    assert any(path.startswith(f"api/models/{PIXART}/tree/") for path in asked)  # snapshot_download's listing
    assert not (tmp_path / "output" / "pretrained_models" / "README.md").exists()  # only the model's files

    hub.requests.clear()
    again = run(["PixArt-XL-2-256x256", "sd-vae-ft-ema"], tmp_path, hub.url)
    assert again.returncode == 0, again.stderr
    assert hub.requests == []


def test_an_interrupted_transfer_resumes_where_it_stopped(tmp_path, hub):
    name, filename = "PixArt-XL-2-512x512", "PixArt-XL-2-512x512.pth"
    cut = CHUNK + 1024 * 1024
    hub.cut_once[filename] = cut  # the server promises the whole file, sends 11 MB of it and hangs up
    done = run([name], tmp_path, hub.url)
    assert done.returncode == 0, done.stderr
    assert pretrained(tmp_path, name).read_bytes() == hub.repos[PIXART][filename]
    gets = [ranged for method, path, ranged in hub.requests if method == "GET" and path.endswith(filename)]
    assert len(gets) == 2 and gets[0] is None
    resumed_at = int(gets[1].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_at <= cut  # the rest only, from the last chunk written


@pytest.mark.parametrize("name, filename, checksum", [
    ("PixArt-XL-2-256x256", "PixArt-XL-2-256x256.pth", "sha256"),
    ("sd-vae-ft-ema", "sd-vae-ft-ema/config.json", "git blob id"),
], ids=["lfs-sha256", "git-blob-id"])
def test_a_corrupted_download_is_detected_and_deleted(tmp_path, hub, name, filename, checksum):
    hub.corrupt.add(filename)  # one byte changed, size and advertised checksum unchanged
    failed = run([name], tmp_path, hub.url)
    assert failed.returncode != 0
    assert "corrupt and was deleted" in failed.stderr and checksum in failed.stderr and filename in failed.stderr
    target = tmp_path / MODEL_ZOO[name].local_dir / filename
    assert not target.exists()

    hub.corrupt.clear()
    assert run([name], tmp_path, hub.url).returncode == 0
    assert target.read_bytes() == hub.repos[PIXART][filename]


def test_verify_compares_the_local_files_with_the_hub(tmp_path, hub):
    assert run(["sd-vae-ft-ema"], tmp_path, hub.url).returncode == 0
    matches = run(["sd-vae-ft-ema", "--verify"], tmp_path, hub.url)
    assert matches.returncode == 0 and "matches the hub" in matches.stdout
    (pretrained(tmp_path, "sd-vae-ft-ema") / "config.json").write_bytes(b'{"_class_name": "AutoencoderKM"}\n')
    differs = run(["sd-vae-ft-ema", "--verify"], tmp_path, hub.url)
    assert differs.returncode == 1 and "config.json: git blob id" in differs.stdout


def test_offline_without_a_local_copy_is_a_named_error_saying_what_goes_where(tmp_path, hub):
    failed = run(["PixArt-XL-2-256x256"], tmp_path, hub.url, offline=True)
    assert failed.returncode != 0
    message = failed.stderr
    assert "PixArt-XL-2-256x256" in message and "HF_HUB_OFFLINE" in message
    assert str(pretrained(tmp_path, "PixArt-XL-2-256x256")) in message  # where to put it
    assert f"{PIXART}/resolve/main/PixArt-XL-2-256x256.pth" in message  # where it comes from
    assert hub.requests == [] and not (tmp_path / "output").exists()  # nothing asked, nothing written


def test_offline_uses_a_local_copy_placed_by_hand(tmp_path, hub):
    target = pretrained(tmp_path, "PixArt-XL-2-256x256")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"my own copy")
    done = run(["PixArt-XL-2-256x256"], tmp_path, hub.url, offline=True)
    assert done.returncode == 0, done.stderr
    assert str(target) in done.stdout and target.read_bytes() == b"my own copy" and hub.requests == []


def test_an_unreachable_hub_is_the_same_named_error(tmp_path):
    with FakeHub({}) as stopped:
        endpoint = stopped.url  # a port nothing listens on once the server is closed
    failed = run(["PixArt-XL-2-256x256"], tmp_path, endpoint)
    assert failed.returncode != 0
    assert "could not be asked" in failed.stderr and str(pretrained(tmp_path, "PixArt-XL-2-256x256")) in failed.stderr


@pytest.mark.parametrize("script, args", [
    ("scripts/inference.py", ["--model_path", "PixArt-XL-2-256x256", "--prompt", "a cat"]),
    ("scripts/interface.py", ["--model_path", "PixArt-XL-2-256x256"]),
    ("scripts/train.py", [str(REPO / "configs/pixart_config/PixArt_xl2_img256_internal.py"), "--load-from",
                          "PixArt-XL-2-256x256", "--work-dir", "work"]),
], ids=["inference", "demo", "training"])
def test_the_scripts_take_a_named_model(tmp_path, script, args):
    failed = run(args, tmp_path, "http://127.0.0.1:9", offline=True, script=REPO / script)
    assert failed.returncode != 0
    assert failed.stderr.startswith("error: PixArt-XL-2-256x256 (PixArt) is not on disk"), failed.stderr[-2000:]
    assert str(pretrained(tmp_path, "PixArt-XL-2-256x256")) in failed.stderr


def test_a_name_or_its_conventional_path_means_the_named_model(tmp_path):
    assert named_model_at("PixArt-XL-2-1024-MS") is MODEL_ZOO["PixArt-XL-2-1024-MS"]
    released = tmp_path / "output/pretrained_models/PixArt-XL-2-512x512.pth"
    assert named_model_at(released, root=tmp_path).image_size == 512
    assert named_model_at(tmp_path / "output/pretrained_models/t5_ckpts", root=tmp_path).name == "t5-v1_1-xxl"
    assert named_model_at(tmp_path / "my_model.pth", root=tmp_path) is None
    assert resolve_model_argument(tmp_path / "my_model.pth", 256) == (tmp_path / "my_model.pth", 256)
    with pytest.raises(ValueError, match="PixArt-XL-2-1024-MS is a 1024 px model; --image_size 512"):
        resolve_model_argument("PixArt-XL-2-1024-MS", 512)


def test_a_conventional_folder_holding_files_of_its_own_is_left_alone(tmp_path):
    t5 = tmp_path / MODEL_ZOO["t5-v1_1-xxl"].path
    t5.mkdir(parents=True)
    (t5 / "config.json").write_text("{}")
    (t5 / "model.safetensors").write_bytes(b"converted by hand")  # not a file of the released folder
    assert fetch_conventional(t5, root=tmp_path) == t5  # no download attempted (there is no network here)
