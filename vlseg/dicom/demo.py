"""The demo data set as DICOM studies, optionally uploaded to a DICOMweb store.

    python scripts/dicom_demo.py --out /tmp/demo_dicom --upload http://127.0.0.1:8042/dicom-web
    python scripts/dicom_demo.py --out /tmp/demo_dicom --start-orthanc /tmp/orthanc   # also starts an Orthanc

Each demo volume becomes a study with one CT-like series (one instance per slice ``vol[:, :, k]``); each chosen
2D image becomes a study with one secondary-capture instance (RGB, modality ES). ``manifest.json`` in the output
folder lists every study / series UID with the source file, so tests and users can find them again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vlseg.dicom.convert import image_to_sc_instance, save, volume_to_ct_series

__all__ = ["demo_to_dicom", "upload_manifest", "main"]


def demo_to_dicom(datalist, out_dir, n_volumes: int | None = None, n_images: int = 2, image_split: str = "test",
                  max_slices: int | None = None) -> dict:
    """Convert ``n_volumes`` demo volumes (all by default) and ``n_images`` 2D images of ``image_split`` into DICOM
    files under ``out_dir/<study name>/``; ``max_slices`` keeps only the slices around the volume's centre
    (fewer slices = faster demos). Returns (and writes) the manifest."""
    import nibabel as nib
    from PIL import Image

    datalist = Path(datalist)
    root = datalist.parent
    data = json.loads(datalist.read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"volumes": [], "images": []}

    volumes = sorted({item["image"] for item in data.get("volumes", [])})
    for i, rel in enumerate(volumes[:n_volumes] if n_volumes is not None else volumes):
        img = nib.load(str(root / rel))
        vol = np.asarray(img.dataobj, dtype=np.float32)
        k0 = 0
        if max_slices and vol.shape[2] > max_slices:
            k0 = (vol.shape[2] - max_slices) // 2
            vol = vol[:, :, k0:k0 + max_slices]
        name = Path(rel).name.replace(".nii.gz", "")
        spacing = [float(s) for s in img.header.get_zooms()[:3]]
        series = volume_to_ct_series(vol, name=f"vlseg-demo-{name}", patient_id=f"VLSEG-{name.upper()}",
                                     patient_name=f"Demo^{name}", spacing=spacing,
                                     study_description=f"vlseg demo volume {name}")
        paths = save(series, out_dir / name)
        manifest["volumes"].append({
            "name": name, "source": str(root / rel), "first_slice": k0, "shape": list(vol.shape),
            "StudyInstanceUID": series[0].StudyInstanceUID, "SeriesInstanceUID": series[0].SeriesInstanceUID,
            "modality": "CT", "files": [str(p) for p in paths]})

    split = sorted({item["image"] for item in data.get(image_split, [])})
    for rel in split[:n_images]:
        rgb = np.asarray(Image.open(root / rel).convert("RGB"))
        name = Path(rel).stem
        ds = image_to_sc_instance(rgb, name=f"vlseg-demo-{name}", patient_id=f"VLSEG-{name.upper()}",
                                  patient_name=f"Demo^{name}", study_description=f"vlseg demo image {name}")
        paths = save([ds], out_dir / name)
        manifest["images"].append({
            "name": name, "source": str(root / rel), "shape": list(rgb.shape),
            "StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
            "modality": ds.Modality, "files": [str(p) for p in paths]})
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def upload_manifest(manifest: dict, dicomweb_url: str) -> int:
    """STOW-RS every file of the manifest to ``dicomweb_url``; returns the number of instances sent."""
    from vlseg.dicom.orthanc import stow_rs

    files = [f for key in ("volumes", "images") for entry in manifest[key] for f in entry["files"]]
    stow_rs(dicomweb_url, files)
    return len(files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", help="demo datalist.json (default: generate / reuse the demo set)")
    p.add_argument("--out", required=True, help="folder for the DICOM files and manifest.json")
    p.add_argument("--volumes", type=int, default=None, help="how many demo volumes (default: all)")
    p.add_argument("--images", type=int, default=2, help="how many 2D test images (default 2)")
    p.add_argument("--max-slices", type=int, default=None, help="keep at most this many central slices per volume")
    p.add_argument("--upload", metavar="DICOMWEB_URL", help="STOW-RS the files to this DICOMweb root")
    p.add_argument("--start-orthanc", metavar="WORKDIR",
                   help="start a throw-away Orthanc in WORKDIR, upload there and keep it running until Ctrl-C")
    args = p.parse_args(argv)

    if args.datalist:
        datalist = Path(args.datalist)
    else:
        from vlseg.data.demo import ensure_demo_dataset

        datalist = ensure_demo_dataset()
    manifest = demo_to_dicom(datalist, args.out, args.volumes, args.images, max_slices=args.max_slices)
    print(f"wrote {len(manifest['volumes'])} volume studies and {len(manifest['images'])} image studies to "
          f"{args.out} (manifest.json)")
    handle = None
    url = args.upload
    if args.start_orthanc:
        from vlseg.dicom.orthanc import start_orthanc

        handle = start_orthanc(args.start_orthanc)
        url = handle.dicomweb
        print(f"Orthanc: {handle.url}  DICOMweb: {url}")
    if url:
        n = upload_manifest(manifest, url)
        print(f"uploaded {n} instances to {url}")
    if handle is not None:
        import time

        from vlseg.dicom.orthanc import stop_orthanc

        import signal

        def _stop(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)  # `kill <pid>` stops Orthanc too, like Ctrl-C
        print("Orthanc keeps running; Ctrl-C (or SIGTERM) stops it", flush=True)
        try:
            while handle.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            stop_orthanc(handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
