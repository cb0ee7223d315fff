"""Data readers, feature building and metrics, plus the small data slices shipped with the package."""

from pathlib import Path

SLICES = Path(__file__).resolve().parent / "slices"
SQUAD_TRAIN_SLICE = SLICES / "squad-train-slice.json.gz"
SQUAD_DEV_SLICE = SLICES / "squad-dev-slice.json.gz"
SST2_TRAIN_SLICE = SLICES / "sst2-train-slice.tsv"
SST2_DEV_SLICE = SLICES / "sst2-dev-slice.tsv"
