"""Download released models by name from the Hugging Face Hub into output/pretrained_models/.

  python tools/download.py --list                                   # the names, what they are, their size
  python tools/download.py PixArt-XL-2-1024-MS t5-v1_1-xxl sd-vae-ft-ema
  python tools/download.py PixArt-XL-2-512x512 --verify              # check the local files against the hub

Files already on disk are kept (no network call when a model is complete); downloads are checked against the hub's
sizes and checksums, and a transfer that breaks resumes where it stopped. HF_HUB_OFFLINE=1 only reports what is
missing; HF_ENDPOINT points at a mirror. The scripts download what they need by themselves (--model_path NAME).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse

from diffusion.model_zoo import MODEL_ZOO, CorruptDownload, ModelNotAvailable, fetch, get, missing_files, verify


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="named models (see --list)")
    parser.add_argument("--list", action="store_true", help="list the named models and whether they are on disk")
    parser.add_argument("--verify", action="store_true",
                        help="check the local files of NAME... against the hub's sizes and checksums (downloads "
                             "nothing)")
    parser.add_argument("--root", default=None,
                        help="the folder holding output/pretrained_models/ (default: the working directory)")
    return parser.parse_args(argv)


def list_models(root):
    for model in MODEL_ZOO.values():
        missing = missing_files(model, root)
        state = "on disk" if not missing else f"{len(missing)} of {len(model.files)} files missing"
        size = f", {model.image_size} px" if model.image_size else ""
        print(f"{model.name:28s} {model.download:>13s}  {model.what}{size}\n{'':28s} {model.repo_id} -> "
              f"{Path(root or '.') / model.path} ({state})")


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        list_models(args.root)
        return
    if not args.names:
        raise SystemExit("error: give one or more names (see --list)")
    try:
        for name in args.names:
            get(name)  # every name is checked before anything downloads
        failed = False
        for name in args.names:
            if args.verify:
                problems = verify(name, args.root)
                failed |= bool(problems)
                print(f"{name}: " + ("matches the hub" if not problems else "\n  ".join(["differs:", *problems])))
            else:
                print(f"{name}: {fetch(name, args.root).absolute()}", flush=True)
    except KeyError as err:
        raise SystemExit(f"error: {err.args[0]}")
    except (ModelNotAvailable, CorruptDownload) as err:
        raise SystemExit(f"error: {err}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
