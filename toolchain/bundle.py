"""Deployable bundles: a folder with ``manifest.json``, ONNX graphs, tokenizer and config files.

The manifest lists every graph with its checksum, length configuration, cost and measurements, so a serving
process (or a later selection step) can pick a graph without opening the others. Bundles are written into a
temporary folder beside the target and renamed into place; manifest updates go through a temporary file and
``os.replace``, so a reader sees either the old or the new manifest, never a partial one. One writer at a time.
See graphs/README.md for the layout and field reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath

from toolchain.errors import ToolchainError
from toolchain.files import write_json
from toolchain.hardware import cpu_info

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("lat", "geep-exit", "geep-predictor")
PRECISIONS = ("fp32", "int8")
EPS = ("cpu", "cuda")
REQUIRED = ("name", "file", "kind", "length_config", "max_seq_length", "macs", "precision", "format", "ep",
            "metrics", "latency_ms", "optimization")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine_id(ep: str = "cpu") -> str:
    """Hardware the numbers were taken on: CPU model and usable cores (``amd-epyc-2c``), or the GPU name."""
    if ep == "cuda":
        import torch

        return _slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "unknown-gpu"
    cpu = cpu_info()
    return f"{_slug(cpu['model'])}-{cpu['cores']}c"


def latency_key(ep: str, batch: int) -> str:
    """Key of an entry's ``latency_ms``: ``"<ep>:<machine id>:b<batch>"``, e.g. ``"cpu:amd-epyc-2c:b1"``."""
    if ep not in EPS:
        raise ToolchainError(f"unknown execution provider {ep!r}: choose one of {', '.join(EPS)}")
    return f"{ep}:{machine_id(ep)}:b{batch}"


def _inside(bundle_dir: Path, rel: object) -> Path:
    """``bundle_dir / rel``, refusing absolute paths, ``..`` and symlinks that lead out of the bundle."""
    if not isinstance(rel, str) or not rel:
        raise ToolchainError(f"{bundle_dir / MANIFEST}: graph file must be a non-empty relative path, got {rel!r}")
    posix = PurePosixPath(rel.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(rel).is_absolute() or ".." in posix.parts:
        raise ToolchainError(f"{bundle_dir / MANIFEST}: graph file {rel!r} escapes the bundle directory")
    path = bundle_dir / posix
    if not path.resolve().is_relative_to(bundle_dir.resolve()):
        raise ToolchainError(f"{bundle_dir / MANIFEST}: graph file {rel!r} escapes the bundle directory")
    return path


def _check_entry(entry: Mapping, where: Path) -> None:
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ToolchainError(f"{where}: graph entry {entry.get('name', '?')!r} lacks {', '.join(missing)}")
    for key, allowed in (("kind", KINDS), ("precision", PRECISIONS), ("ep", EPS)):
        if entry[key] not in allowed:
            raise ToolchainError(f"{where}: graph {entry['name']!r} has {key} {entry[key]!r}; expected one of {allowed}")


def _check_manifest(manifest: object, bundle_dir: Path) -> dict:
    where = bundle_dir / MANIFEST
    if not isinstance(manifest, dict):
        raise ToolchainError(f"{where} is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ToolchainError(f"{where} has schema_version {version!r}; this toolchain reads version {SCHEMA_VERSION}")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, list) or not all(isinstance(g, dict) for g in graphs):
        raise ToolchainError(f"{where}: 'graphs' must be a list of objects")
    names = set()
    for entry in graphs:
        _check_entry(entry, where)
        _inside(bundle_dir, entry["file"])
        if entry["name"] in names:
            raise ToolchainError(f"{where}: graph name {entry['name']!r} appears twice")
        names.add(entry["name"])
    for entry in graphs:
        if entry.get("parent") is not None and entry["parent"] not in names:
            raise ToolchainError(f"{where}: graph {entry['name']!r} names an unknown parent {entry['parent']!r}")
    return manifest


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> dict:
    """The bundle's manifest, checked; ``verify`` also checks every graph file's SHA-256."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise ToolchainError(f"bundle not found: {bundle_dir}")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise ToolchainError(f"{bundle_dir} is not a bundle (no {MANIFEST})")
    try:
        manifest = _check_manifest(json.loads(path.read_text(encoding="utf-8")), bundle_dir)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolchainError(f"unreadable {path}: {e}") from None
    if verify:
        for entry in manifest["graphs"]:
            graph = _inside(bundle_dir, entry["file"])
            if not graph.is_file():
                raise ToolchainError(f"bundle {bundle_dir} is missing graph file {entry['file']}")
            if sha256_file(graph) != entry.get("sha256"):
                raise ToolchainError(f"checksum mismatch for {entry['file']} in {bundle_dir}: the file changed after export")
    return manifest


def graph_path(bundle_dir: str | Path, entry: Mapping) -> Path:
    """Absolute path of a manifest entry's graph file."""
    return _inside(Path(bundle_dir), entry["file"])


def update_manifest(bundle_dir: str | Path, fn: Callable[[dict], dict | None]) -> dict:
    """Apply ``fn`` to the manifest (it may mutate it or return a new one), check it, replace manifest.json atomically."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=False)
    result = fn(manifest)
    manifest = _check_manifest(manifest if result is None else result, bundle_dir)
    write_json(bundle_dir / MANIFEST, manifest)
    return manifest


def _place(src: Path, dst: Path) -> None:
    """Hard-link (same file system) or copy ``src`` to ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_bundle(out_dir: str | Path, entries: list[dict], files: Mapping[str, str | Path], force: bool = False, *,
                 task: str, source_checkpoint: str | Path) -> Path:
    """Create a bundle at ``out_dir`` from graph ``entries`` and ``files`` ({relative path: source file}).

    Each entry's ``file`` must be one of ``files``; ``sha256`` and ``size_bytes`` are filled in here. The bundle is
    assembled in a temporary folder beside ``out_dir`` and renamed into place; an existing ``out_dir`` is an error
    unless ``force``, and is only removed once the new bundle is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ToolchainError(f"output {out_dir} already exists (use --force to replace it)")
    for entry in entries:
        if entry["file"] not in files:
            raise ToolchainError(f"graph {entry['name']!r}: file {entry['file']!r} is not among the bundle's files")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be served
    old = out_dir.parent / f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
    try:
        for rel, src in files.items():
            _place(Path(src), _inside(tmp, rel))
        graphs = [{**e, "sha256": sha256_file(tmp / e["file"]), "size_bytes": (tmp / e["file"]).stat().st_size}
                  for e in entries]
        manifest = {"schema_version": SCHEMA_VERSION, "task": task, "source_checkpoint": str(source_checkpoint),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "graphs": graphs}
        _check_manifest(manifest, tmp)
        write_json(tmp / MANIFEST, manifest)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def add_graph(bundle_dir: str | Path, src: str | Path, entry: dict) -> dict:
    """Copy graph ``src`` into the bundle as ``entry["file"]`` and append ``entry`` (checksum and size filled in).

    For later steps such as quantization; ``entry["parent"]`` may name the graph it was derived from.
    Returns the new manifest.
    """
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=False)
    _check_entry(entry, bundle_dir / MANIFEST)
    if any(g["name"] == entry["name"] for g in manifest["graphs"]):
        raise ToolchainError(f"bundle {bundle_dir} already has a graph named {entry['name']!r}")
    if not Path(src).is_file():
        raise ToolchainError(f"graph file not found: {src}")
    dst = _inside(bundle_dir, entry["file"])
    if dst.exists():
        raise ToolchainError(f"bundle {bundle_dir} already has a file {entry['file']}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        full = {**entry, "sha256": sha256_file(tmp), "size_bytes": tmp.stat().st_size}
        os.replace(tmp, dst)
        return update_manifest(bundle_dir, lambda m: {**m, "graphs": [*m["graphs"], full]})
    except BaseException:
        tmp.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
        raise
