"""Make tests/data/real/: small crops of the shared real sets (CC0 EMPIAR data), so the real-data tests run on a
clone with nothing beside it. Run once from the repository root with ../shared/data present:

    python tests/data/make_real_crops.py

Each set keeps its folder layout (micrographs/*.mrc with the original dtype and header pixel size, particles.txt
in Topaz's format with the particles inside the crop); the crop is the top-left corner of the first micrographs.
"""

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "real"
SETS = {"empiar10146_apoferritin": (3, 256, 320), "empiar10028_ribosome": (3, 256, 256)}


def main():
    for name, (count, h, w) in SETS.items():
        src, dst = SHARED / name, OUT / name
        (dst / "micrographs").mkdir(parents=True, exist_ok=True)
        paths = sorted((src / "micrographs").glob("*.mrc"))[:count]
        for path in paths:
            with mrcfile.open(path, permissive=True) as mrc:
                data = np.array(mrc.data[:h, :w])
                voxel = mrc.voxel_size
            with mrcfile.new(dst / "micrographs" / path.name, overwrite=True) as out:
                out.set_data(data)
                out.voxel_size = voxel
        table = pd.read_csv(src / "particles.txt", sep="\t", dtype={"image_name": str})
        keep = table["image_name"].isin([p.stem for p in paths]) & (table["x_coord"] < w) & (table["y_coord"] < h)
        table[keep].to_csv(dst / "particles.txt", sep="\t", index=False, float_format="%.1f")
        print(name, len(paths), "micrographs", int(keep.sum()), "particles")


if __name__ == "__main__":
    main()
