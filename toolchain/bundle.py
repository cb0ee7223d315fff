"""Deployable bundles: a folder with ``manifest.json``, ONNX graphs, tokenizer and config files.

The manifest lists every graph with its checksum, length configuration, cost and measurements, so a serving
process (or a later selection step) can pick a graph without opening the others. Bundles are written into a
temporary folder beside the target and renamed into place; manifest updates go through a temporary file and
``os.replace``, so a reader sees either the old or the new manifest, never a partial one. One writer at a time.

The graphs of one checkpoint hold the same weights (every length configuration, every GEEP depth, the INT8 graphs of
every configuration), so each graph keeps its tensors of 1 KiB and more as ONNX external data in ``weights/`` beside
it, one file per distinct content, named by its SHA-256 and shared by every graph that holds that tensor.
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
from toolchain.files import atomic_path, write_json
from toolchain.hardware import cpu_info

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("lat", "geep-exit", "geep-predictor")
PRECISIONS = ("fp32", "int8")
EPS = ("cpu", "cuda")
REQUIRED = ("name", "file", "kind", "length_config", "max_seq_length", "macs", "precision", "format", "ep",
            "metrics", "latency_ms", "optimization")
WEIGHTS = "weights"  # the shared external-data folder beside each graph file
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the graph file (onnx's own default threshold)
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine_id(ep: str = "cpu") -> str:
    """Hardware the numbers were taken on: CPU model, family.model and usable cores (``amd-epyc-23-1-2c``), or the
    GPU name."""
    if ep == "cuda":
        import torch

        return _slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "unknown-gpu"
    cpu = cpu_info()
    return f"{_slug(cpu['model'] + ' ' + cpu['generation'])}-{cpu['cores']}c"


def latency_key(ep: str, batch: int) -> str:
    """Key of an entry's ``latency_ms``: ``"<ep>:<machine id>:b<batch>"``, e.g. ``"cpu:amd-epyc-23-1-2c:b1"``."""
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
        weights = entry.get("weights", [])
        if not isinstance(weights, list):
            raise ToolchainError(f"{where}: graph {entry['name']!r} has weights {weights!r}; expected a list of files")
        for rel in weights:
            _inside(bundle_dir, rel)
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
        wanted = {}  # weight file -> a graph that uses it; a shared file is hashed once
        for entry in manifest["graphs"]:
            _check_file(bundle_dir, entry["file"], entry.get("sha256"), "graph file")
            for rel in entry.get("weights", []):
                wanted.setdefault(rel, entry["name"])
        for rel, user in sorted(wanted.items()):
            _check_file(bundle_dir, rel, PurePosixPath(rel).stem, f"weights file (of graph {user!r})")
    return manifest


def _check_file(bundle_dir: Path, rel: str, sha256: str | None, what: str) -> None:
    path = _inside(bundle_dir, rel)
    if not path.is_file():
        raise ToolchainError(f"bundle {bundle_dir} is missing {what} {rel}")
    if sha256_file(path) != sha256:
        raise ToolchainError(f"checksum mismatch for {rel} in {bundle_dir}: the file changed after export")


def chosen_graph(manifest: Mapping, bundle_dir: str | Path) -> str:
    """The name of the graph the search chose (the manifest's ``chosen``, set by export --pareto)."""
    if not manifest.get("chosen"):
        raise ToolchainError(f"bundle {bundle_dir} has no chosen graph (export it with --pareto from a search "
                             "that chose one)")
    return manifest["chosen"]


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


def _store_graph(src: Path, root: Path, rel: str) -> list[str]:
    """Write graph ``src`` into bundle folder ``root`` as ``rel`` (atomically), its tensors of at least
    EXTERNAL_MIN_BYTES moved to ``weights/<sha256>.bin`` beside it (created only when no graph holds that content
    yet). Returns the weight files it references, relative to ``root``."""
    import onnx  # here, not above: reading and serving a bundle do not need it
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    dst = _inside(root, rel)
    store = dst.parent / WEIGHTS
    store.mkdir(parents=True, exist_ok=True)
    try:
        model = onnx.load(str(src))  # with its own external data, if any
    except Exception as e:
        raise ToolchainError(f"cannot read graph {src}: {type(e).__name__}: {e}") from None
    used = set()
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.STRING:
            continue
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        data = tensor.raw_data
        if len(data) < EXTERNAL_MIN_BYTES:
            continue
        name = f"{hashlib.sha256(data).hexdigest()}.bin"
        if not (store / name).is_file():
            with atomic_path(store / name) as tmp:
                tmp.write_bytes(data)
        set_external_data(tensor, f"{WEIGHTS}/{name}", length=len(data))
        for field in _DATA_FIELDS:
            tensor.ClearField(field)
        used.add((store / name).relative_to(root).as_posix())
    with atomic_path(dst) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return sorted(used)


def graph_bytes(bundle_dir: Path, rel: str, weights: list[str]) -> int:
    """What one graph needs on disk: its file and the weight files it references."""
    return _inside(bundle_dir, rel).stat().st_size + sum(_inside(bundle_dir, w).stat().st_size for w in weights)


def bundle_bytes(bundle_dir: str | Path, graphs: list[dict]) -> int:
    """What ``graphs`` take on disk together: their graph files and each weight file they share, counted once."""
    bundle_dir = Path(bundle_dir)
    files = {g["file"] for g in graphs} | {w for g in graphs for w in g.get("weights", [])}
    return sum(_inside(bundle_dir, rel).stat().st_size for rel in files)


def prune_weights(bundle_dir: str | Path) -> None:
    """Remove the weight files no manifest entry references (left by a graph addition that was rolled back)."""
    bundle_dir = Path(bundle_dir)
    graphs = load_manifest(bundle_dir, verify=False)["graphs"]
    used = {_inside(bundle_dir, rel).resolve() for g in graphs for rel in g.get("weights", [])}
    for store in {_inside(bundle_dir, g["file"]).parent / WEIGHTS for g in graphs} | {bundle_dir / WEIGHTS}:
        for path in store.glob("*.bin") if store.is_dir() else ():
            if path.resolve() not in used:
                path.unlink(missing_ok=True)


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

    Each entry's ``file`` must be one of ``files``; ``sha256``, ``weights`` (its shared weight files) and
    ``size_bytes`` (the graph file and those) are filled in here. The bundle is
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
        weights = {}
        graph_files = {e["file"] for e in entries}
        for rel, src in files.items():
            if rel in graph_files:
                weights[rel] = _store_graph(Path(src), tmp, rel)
            else:
                _place(Path(src), _inside(tmp, rel))
        graphs = [{**e, "sha256": sha256_file(tmp / e["file"]), "weights": weights[e["file"]],
                   "size_bytes": graph_bytes(tmp, e["file"], weights[e["file"]])} for e in entries]
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
    """Store graph ``src`` in the bundle as ``entry["file"]`` (its weights shared with the graphs already there) and
    append ``entry`` (checksum, weights and size filled in).

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
    try:
        weights = _store_graph(Path(src), bundle_dir, entry["file"])
        full = {**entry, "sha256": sha256_file(dst), "weights": weights,
                "size_bytes": graph_bytes(bundle_dir, entry["file"], weights)}
        return update_manifest(bundle_dir, lambda m: {**m, "graphs": [*m["graphs"], full]})
    except BaseException:
        dst.unlink(missing_ok=True)
        prune_weights(bundle_dir)
        raise
