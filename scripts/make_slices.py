"""Rebuild the small data slices shipped in toolchain/data/slices from ../shared/data.

Run from the repo root: python scripts/make_slices.py [SHARED_DATA_DIR]
"""
import csv
import gzip
import json
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
out = Path("toolchain/data/slices")


def squad_slice(path: Path, n_questions: int, paragraphs_per_article: int) -> dict:
    """Take the first paragraphs of successive articles until n_questions are collected."""
    data = json.load(gzip.open(path))
    articles, count = [], 0
    for article in data["data"]:
        paragraphs = article["paragraphs"][:paragraphs_per_article]
        articles.append({"title": article["title"], "paragraphs": paragraphs})
        count += sum(len(p["qas"]) for p in paragraphs)
        if count >= n_questions:
            break
    return {"version": data["version"], "data": articles}


def write_json_gz(obj: dict, path: Path) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(json.dumps(obj, ensure_ascii=False).encode())


def tsv_slice(lines: list[str], n: int, path: Path) -> None:
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        w.writerow(header)
        w.writerows(body[:n])


write_json_gz(squad_slice(src / "squad-v1.1/train-v1.1.reconstructed.json.gz", 600, 2), out / "squad-train-slice.json.gz")
write_json_gz(squad_slice(src / "squad-v1.1/dev-v1.1.json.gz", 400, 3), out / "squad-dev-slice.json.gz")
tsv_slice(gzip.open(src / "sst2/train.tsv.gz", "rt").read().splitlines(), 3000, out / "sst2-train-slice.tsv")
tsv_slice(open(src / "sst2/dev.tsv").read().splitlines(), 400, out / "sst2-dev-slice.tsv")
