"""The `toolchain` command line: a thin click layer over the modules that do the work."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from toolchain.errors import ToolchainError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable: never wait on one
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Group(click.Group):
    """Turns ToolchainError into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ToolchainError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group)
@click.version_option(package_name="toolchain")
def main() -> None:
    """Export-and-optimize toolchain for length-adaptive and early-exit BERT-style encoders."""


def _default_data(task: str, split: str) -> Path:
    from toolchain import data

    return {("squad", "train"): data.SQUAD_TRAIN_SLICE, ("squad", "dev"): data.SQUAD_DEV_SLICE,
            ("classify", "train"): data.SST2_TRAIN_SLICE, ("classify", "dev"): data.SST2_DEV_SLICE}[(task, split)]


def _columns_options(f):
    f = click.option("--text-columns", default="sentence", show_default=True,
                     help="classify: text column(s), comma separated (names, or 0-based numbers without a header)")(f)
    f = click.option("--label-column", default="label", show_default=True, help="classify: label column")(f)
    return click.option("--header/--no-header", default=True, show_default=True,
                        help="classify: the file's first row names the columns")(f)


TASK = click.option("--task", type=click.Choice(["squad", "classify"]), required=True)
POSITIVE = click.IntRange(min=1)


TRAIN_OPTIONS = [
    click.option("--max-train-examples", type=POSITIVE, default=None),
    click.option("--max-eval-examples", type=POSITIVE, default=None),
    click.option("--epochs", type=float, default=2.0, show_default=True),
    click.option("--lr", type=float, default=5e-5, show_default=True),
    click.option("--batch-size", type=POSITIVE, default=16, show_default=True),
    click.option("--grad-accum", type=POSITIVE, default=1, show_default=True),
    click.option("--seed", type=int, default=42, show_default=True),
    click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True),
    click.option("--precision", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]), show_default=True,
                 help="bf16/fp16 autocast needs CUDA"),
    click.option("--save-steps", type=POSITIVE, default=100, show_default=True, help="resume state every N steps"),
    click.option("--resume", is_flag=True, help="continue an interrupted run with the same settings"),
    click.option("--force", is_flag=True, help="replace an existing output folder"),
]


def _train_options(f):
    for option in reversed(TRAIN_OPTIONS):
        f = option(f)
    return f


def _train_config(kw: dict):
    from toolchain.training import TrainConfig

    return TrainConfig(**{k: kw.pop(k) for k in ("epochs", "lr", "batch_size", "grad_accum", "seed", "precision",
                                                 "save_steps")})


@main.command()
@TASK
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="HF model folder to start from (default: the packaged MiniLM-L6-H384)")
@click.option("--train-data", type=click.Path(path_type=Path), default=None,
              help="SQuAD .json[.gz] or classification TSV/CSV (default: the packaged slice)")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="dev set (default: packaged slice)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="checkpoint folder to write")
@click.option("--max-seq-length", type=POSITIVE, default=None, help="default 384 (squad) or 128 (classify)")
@click.option("--doc-stride", type=POSITIVE, default=128, show_default=True)
@_train_options
@_columns_options
def finetune(task, model_dir, train_data, eval_data, out_dir, max_seq_length, doc_stride, text_columns, label_column,
             header, **kw):
    """Fine-tune an encoder for SQuAD-style QA or text classification."""
    from toolchain.data.prepare import Columns
    from toolchain.finetune import finetune as run

    cfg = _train_config(kw)
    metrics = run(task=task, model_dir=model_dir, train_path=train_data or _default_data(task, "train"),
                  eval_path=eval_data or _default_data(task, "dev"), out_dir=out_dir,
                  max_train_examples=kw["max_train_examples"], max_eval_examples=kw["max_eval_examples"],
                  max_seq_length=max_seq_length, doc_stride=doc_stride, cfg=cfg, device_name=kw["device"],
                  columns=Columns.parse(text_columns, label_column, header), resume=kw["resume"], force=kw["force"])
    click.echo(json.dumps(metrics, indent=2))


@main.command("eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help="checkpoint folder")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="dev set (default: packaged slice)")
@click.option("--max-eval-examples", type=POSITIVE, default=None)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write metrics here")
def eval_cmd(model_dir, eval_data, max_eval_examples, device, json_out):
    """Evaluate a fine-tuned checkpoint with PyTorch (EM/F1 or accuracy)."""
    from toolchain.data.prepare import Columns
    from toolchain.finetune import evaluate_checkpoint
    from toolchain.models import load_model, load_tokenizer, read_meta
    from toolchain.training import resolve_device

    meta = read_meta(model_dir)
    if not meta:
        raise ToolchainError(f"{model_dir} is not a toolchain checkpoint (no toolchain.json)")
    task = meta["task"]
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, task)
    columns = Columns(**{**meta["columns"], "text": tuple(meta["columns"]["text"])}) if meta.get("columns") else Columns()
    metrics = evaluate_checkpoint(model, tokenizer, task, eval_data or _default_data(task, "dev"), max_eval_examples,
                                  meta["max_seq_length"], meta.get("doc_stride", 128), resolve_device(device),
                                  columns, meta.get("labels"))
    _write_json(json_out, metrics)
    click.echo(json.dumps(metrics, indent=2))


@main.command()
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True, help="SQuAD v1.1 dev .json[.gz]")
@click.option("--predictions", type=click.Path(path_type=Path), required=True,
              help='JSON {"question id": "answer text"}')
def score(data_path, predictions):
    """Score a predictions file exactly as the official SQuAD v1.1 evaluate script does."""
    from toolchain.data.metric import squad_scores
    from toolchain.data.squad import gold_answers, load_squad

    if not data_path.is_file():
        raise ToolchainError(f"SQuAD data file not found: {data_path}")
    gold = gold_answers(load_squad(data_path))
    try:
        preds = json.loads(Path(predictions).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolchainError(f"cannot read predictions {predictions}: {e}") from None
    if not isinstance(preds, dict) or not all(isinstance(v, str) for v in preds.values()):
        raise ToolchainError(f"{predictions} must be a JSON object mapping question ids to answer strings")
    missing = len(set(gold) - set(preds))
    if missing:
        click.echo(f"{missing} of {len(gold)} questions have no prediction and score 0", err=True)
    click.echo(json.dumps(squad_scores(gold, preds)))


@main.command("train-lat")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="fine-tuned checkpoint (toolchain finetune)")
@click.option("--train-data", type=click.Path(path_type=Path), default=None, help="default: the packaged slice")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="default: the packaged slice")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--length-drop-ratio-bound", type=float, default=0.2, show_default=True)
@click.option("--layer-drop", type=float, default=0.2, show_default=True, help="LayerDrop probability for sub-models")
@click.option("--num-sandwich", type=click.IntRange(min=0), default=2, show_default=True)
@_train_options
def train_lat_cmd(model_dir, train_data, eval_data, out_dir, length_drop_ratio_bound, layer_drop, num_sandwich, **kw):
    """Drop-and-Restore training: make a fine-tuned model robust to dropping tokens per layer."""
    from toolchain.models import read_meta
    from toolchain.train_lat import SandwichConfig, train_lat

    task = read_meta(model_dir).get("task", "squad")
    cfg = _train_config(kw)
    metrics = train_lat(model_dir=model_dir, train_path=train_data or _default_data(task, "train"),
                        eval_path=eval_data or _default_data(task, "dev"), out_dir=out_dir,
                        max_train_examples=kw["max_train_examples"], max_eval_examples=kw["max_eval_examples"],
                        cfg=cfg, sandwich=SandwichConfig(length_drop_ratio_bound, layer_drop, num_sandwich),
                        device_name=kw["device"], resume=kw["resume"], force=kw["force"])
    click.echo(json.dumps(metrics, indent=2))


@main.command("search")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="length-adaptive checkpoint (toolchain train-lat)")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="dev set (default: packaged slice)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="folder for pareto.json, pareto.png and the evaluation cache")
@click.option("--search-examples", type=POSITIVE, default=200, show_default=True, help="dev examples scored in the search")
@click.option("--report-examples", type=POSITIVE, default=200, show_default=True, help="disjoint dev examples for reporting")
@click.option("--iterations", type=POSITIVE, default=30, show_default=True)
@click.option("--population", type=POSITIVE, default=20, show_default=True)
@click.option("--parents", type=POSITIVE, default=10, show_default=True)
@click.option("--mutations", type=click.IntRange(min=0), default=30, show_default=True)
@click.option("--crossovers", type=click.IntRange(min=0), default=30, show_default=True)
@click.option("--mutation-prob", type=float, default=0.5, show_default=True)
@click.option("--length-drop-ratio-bound", type=float, default=0.2, show_default=True, help="for the initial population")
@click.option("--min-macs-ratio", type=float, default=0.0, show_default=True)
@click.option("--max-macs-ratio", type=float, default=1.0, show_default=True)
@click.option("--choose-tolerance", type=float, default=1.0, show_default=True,
              help="chosen = cheapest frontier point within this many points of full length (search split)")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--resume", is_flag=True, help="continue an interrupted search (cached evaluations are reused)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
def search_cmd(model_dir, eval_data, out_dir, search_examples, report_examples, choose_tolerance, batch_size, device,
               resume, force, **kw):
    """Evolutionary search for Pareto-best length configurations (accuracy vs MACs)."""
    from toolchain.models import read_meta
    from toolchain.search import SearchConfig, search

    task = read_meta(model_dir).get("task", "squad")
    result = search(model_dir=model_dir, eval_path=eval_data or _default_data(task, "dev"), out_dir=out_dir,
                    search_examples=search_examples, report_examples=report_examples, cfg=SearchConfig(**kw),
                    device_name=device, choose_tolerance=choose_tolerance, batch_size=batch_size, resume=resume,
                    force=force)
    click.echo(json.dumps({"full": result["full"], "chosen": result["chosen"],
                           "frontier_size": len(result["frontier"]), "evaluated": result["evaluated"]}, indent=2))


@main.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None, help="HF model folder")
@click.option("--arch", type=click.Choice(["bert-base", "minilm-l6-h384"]), default=None)
@click.option("--length-cfg", default="full", show_default=True, help='tokens kept per layer, e.g. "269,253,252,202,104,34"')
@click.option("--max-seq-length", type=POSITIVE, default=384, show_default=True)
@click.option("--head", type=click.Choice(["qa", "classify"]), default="qa", show_default=True)
def macs(model_dir, arch, length_cfg, max_seq_length, head):
    """Analytic MACs (batch 1) of a model at a length configuration; the count is the last line."""
    from transformers import AutoConfig

    from toolchain.macs import config_for_arch, count_macs
    from toolchain.models import default_model_dir

    if model_dir and arch:
        raise ToolchainError("give --model or --arch, not both")
    if arch:
        config = config_for_arch(arch)
    else:
        model_dir = Path(model_dir or default_model_dir())
        if not (model_dir / "config.json").is_file():
            raise ToolchainError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
        config = AutoConfig.from_pretrained(model_dir)
    full = count_macs(config, None, max_seq_length, head)
    n = count_macs(config, length_cfg, max_seq_length, head)
    click.echo(f"{n / 1e9:.3f} GMACs, {100 * n / full:.1f}% of full length")
    click.echo(n)


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--only", multiple=True, help="run only steps of this command (repeatable)")
def run_cmd(recipe, only):
    """Run a YAML pipeline recipe; finished steps are skipped, interrupted ones resumed."""
    from toolchain.recipe import run_recipe

    run_recipe(recipe, main, only)


def _write_json(path: Path | None, obj) -> None:
    """Write JSON atomically (temp file, then rename)."""
    if path is None:
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ToolchainError(f"cannot write {path}: {e}") from None


if __name__ == "__main__":
    main()
