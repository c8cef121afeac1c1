"""Convert the MedCLIPSeg authors' released checkpoints into this bundle's checkpoint format.

Usage (from ``bundles/medclipseg``)::

    python -m scripts.convert_upstream models/upstream/Kvasir/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth \\
        models/model_kvasir_upstream.pt

The output is ``{"model": state_dict}``, what ``CheckpointLoader`` (``--checkpoint``) reads. Before writing, the
converted tensors are loaded STRICTLY into the network of ``configs/inference.json`` + ``configs/unimedclip.json``
(built with random weights: only names and shapes are compared, on the meta device), so a file that does not fit
fails here with the names that are missing or left over. The mapping and the upstream names that have no
counterpart (and why) are printed; see ``scripts/upstream.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parents[1]


def expected_state(config_files: list[str], overrides: dict) -> dict:
    """Names and shapes of the bundle network of ``config_files`` (built on the meta device, no weights read)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    parser["bundle_root"] = str(BUNDLE)
    parser["clip_pretrained"] = None  # the released file carries the CLIP weights itself
    parser["require_pretrained"] = False
    parser["tokenizer"] = None  # no vocabulary needed to compare names and shapes
    for k, v in overrides.items():
        parser[k] = v
    with torch.device("meta"):
        net = parser.get_parsed_content("network_def")
    return net.state_dict()


def main(argv=None) -> int:
    sys.path.insert(0, str(BUNDLE))
    from scripts.upstream import converted_checkpoint

    from vlseg.weights import compare_state

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="released checkpoint ({'model': CustomCLIP.state_dict(), ...})")
    ap.add_argument("output", help="converted checkpoint ({'model': state_dict}) for --checkpoint")
    ap.add_argument("--config_file", nargs="+", default=[str(BUNDLE / "configs" / "inference.json"),
                                                          str(BUNDLE / "configs" / "unimedclip.json")])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                    help="config overrides of the architecture, e.g. adapter_layers='[1,2]' (JSON values)")
    args = ap.parse_args(argv)

    state, report = converted_checkpoint(args.source)
    print(f"{args.source}: {report.describe()}")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    check = compare_state(expected_state(args.config_file, overrides), state)
    if not check.exact:
        print(f"does NOT fit the network of {args.config_file}: {check.describe()}", file=sys.stderr)
        return 1
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, args.output)
    print(f"fits exactly ({check.matched} tensors); wrote {args.output}. Run it with --checkpoint {args.output} "
          f"and the configs {' '.join(Path(c).name for c in args.config_file)} plus --bgr_imagenet_compat True")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
