"""The `toolchain` command line: a thin click layer over the modules that do the work."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from toolchain.errors import ToolchainError
from toolchain.files import write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable: never wait on one
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Group(click.Group):
    """Turns ToolchainError, and a package missing from a serving-only install, into one line on stderr and exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ToolchainError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as e:
            if not e.name:
                raise
            click.echo(f"error: `toolchain {ctx.invoked_subcommand}` needs the Python package {e.name.split('.')[0]!r}, "
                       "which is not installed (a serving-only install runs select and predict; "
                       "install toolchain with its dependencies for the rest)", err=True)
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


def _exit_table_options(f):
    """GEEP exit-table options shared by bench-geep and export-geep (`--aggregation auto` tunes as `--tune-for` says)."""
    f = click.option("--tune-data", type=click.Path(path_type=Path), default=None,
                     help="labelled data held out from training to tune the auto aggregation on (default: a held-out "
                          "fifth of --train-data, whose phrases the model has seen); bench-geep given its --eval-data "
                          "cross-fits two halves")(f)
    f = click.option("--tolerance", type=float, default=1.0, show_default=True,
                     help="accuracy points below full depth that --tune-for accuracy may give up (on the tune data)")(f)
    f = click.option("--tune-for", type=click.Choice(["accuracy", "exits"]), default="accuracy", show_default=True,
                     help="auto aggregation: fewest layers within --tolerance of full-depth accuracy, or best exit agreement")(f)
    return click.option("--aggregation", default="auto", show_default=True, help="auto | mean | max | quantile:Q")(f)


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
    click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
                 help="batch rows of similar length (each batch is cut to its longest row either way)"),
    click.option("--resume", is_flag=True, help="continue an interrupted run with the same settings"),
    click.option("--force", is_flag=True, help="replace an existing output folder"),
]


def _guard_option(f):
    return click.option("--protect-answers", type=click.IntRange(min=0), default=None,
                        help="QA answer guard: the QA head's top N start and N end positions survive every drop "
                             "(default 32 for QA; 0: LAT's significance alone; with --pareto: the search's)")(f)


def _train_options(f):
    for option in reversed(TRAIN_OPTIONS):
        f = option(f)
    return f


def _train_config(kw: dict):
    from toolchain.training import TrainConfig

    return TrainConfig(**{k: kw.pop(k) for k in ("epochs", "lr", "batch_size", "grad_accum", "seed", "precision",
                                                 "save_steps", "group_by_length")})


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
@click.option("--eval-skip", type=click.IntRange(min=0), default=0, show_default=True,
              help="skip this many questions of the seeded dev permutation first (the search's report split: 1000)")
@click.option("--length-cfg", default="full", show_default=True,
              help='tokens kept per layer, e.g. "267,267,243,187,95,67" (Drop-and-Restore in PyTorch)')
@click.option("--pareto", type=click.Path(path_type=Path), default=None,
              help="pareto.json from toolchain search: evaluate the configuration it chose (instead of --length-cfg)")
@click.option("--gap", is_flag=True,
              help="also evaluate full length and report the configuration's difference to it with the paired "
                   "standard error over the questions")
@click.option("--max-seq-length", type=POSITIVE, default=None, help="default: the checkpoint's")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write metrics here")
@_guard_option
def eval_cmd(model_dir, eval_data, max_eval_examples, eval_skip, length_cfg, pareto, gap, max_seq_length, device,
             json_out, protect_answers):
    """Evaluate a fine-tuned checkpoint with PyTorch (EM/F1 or accuracy), at full length or a length configuration."""
    from toolchain.data.prepare import Columns
    from toolchain.export import chosen_config, searched_guard
    from toolchain.finetune import evaluate_checkpoint
    from toolchain.lat import LengthAdaptiveModel, parse_length_config
    from toolchain.models import check_seq_length, load_model, load_tokenizer, read_meta
    from toolchain.search import Scorer, dev_split
    from toolchain.training import resolve_device

    meta = read_meta(model_dir)
    if not meta:
        raise ToolchainError(f"{model_dir} is not a toolchain checkpoint (no toolchain.json)")
    if pareto is not None and length_cfg != "full":
        raise ToolchainError("give --length-cfg or --pareto, not both")
    task, seq = meta["task"], max_seq_length or meta["max_seq_length"]
    model = load_model(model_dir, task)
    length_config = parse_length_config(chosen_config(pareto) if pareto else length_cfg,
                                        model.config.num_hidden_layers, seq)
    if gap and length_config is None:
        raise ToolchainError("--gap compares a length configuration with full length: give --length-cfg or --pareto")
    if pareto:
        protect_answers = searched_guard(pareto, protect_answers)
    if length_config is not None:
        model = LengthAdaptiveModel(model, meta.get("keep_cls"), protect_answers)
    eval_path, dev = eval_data or _default_data(task, "dev"), resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    if gap:
        check_seq_length(model.config, seq)
        scorer = Scorer(model.to(dev), task, dev_split(eval_path, tokenizer, meta, seq, max_eval_examples, eval_skip),
                        dev, None)
        metrics = {**scorer(length_config), "full": scorer(None), **scorer.gap(length_config)}
    else:
        metrics = evaluate_checkpoint(model, tokenizer, task, eval_path, max_eval_examples, seq,
                                      meta.get("doc_stride", 128), dev, Columns.from_meta(meta), meta.get("labels"),
                                      eval_skip, length_config)
    metrics["length_config"] = list(length_config) if length_config else "full"
    if length_config is not None:
        metrics["protect_answers"] = model.protect_answers
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
@click.option("--sub-min-macs-ratio", type=float, default=0.0, show_default=True,
              help="random sub-models are redrawn until their MACs are at least this share of full length's")
@click.option("--sub-max-macs-ratio", type=float, default=1.0, show_default=True,
              help="... and at most this share (the band a search deploys from)")
@click.option("--drop-at", type=click.Choice(["padded", "real"]), default="padded", show_default=True,
              help="sample sub-models' lengths at the padded length (LAT) or at each batch's real length")
@click.option("--max-seq-length", type=POSITIVE, default=None, help="default: the checkpoint's")
@click.option("--train-skip", type=click.IntRange(min=0), default=0, show_default=True,
              help="skip this many questions of the seeded train permutation first (e.g. those fine-tuning saw)")
@click.option("--min-real-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="train only on windows with at least this many real (non-padding) tokens")
@_train_options
def train_lat_cmd(model_dir, train_data, eval_data, out_dir, length_drop_ratio_bound, layer_drop, num_sandwich,
                  sub_min_macs_ratio, sub_max_macs_ratio, drop_at, max_seq_length, train_skip, min_real_tokens, **kw):
    """Drop-and-Restore training: make a fine-tuned model robust to dropping tokens per layer."""
    from toolchain.models import read_meta
    from toolchain.train_lat import SandwichConfig, train_lat

    task = read_meta(model_dir).get("task", "squad")
    cfg = _train_config(kw)
    metrics = train_lat(model_dir=model_dir, train_path=train_data or _default_data(task, "train"),
                        eval_path=eval_data or _default_data(task, "dev"), out_dir=out_dir,
                        max_train_examples=kw["max_train_examples"], max_eval_examples=kw["max_eval_examples"],
                        cfg=cfg, sandwich=SandwichConfig(length_drop_ratio_bound, layer_drop, num_sandwich,
                                                                  sub_macs_band=(sub_min_macs_ratio, sub_max_macs_ratio),
                                                                  drop_at=drop_at),
                        device_name=kw["device"], max_seq_length=max_seq_length, train_skip=train_skip,
                        min_real_tokens=min_real_tokens, resume=kw["resume"], force=kw["force"])
    click.echo(json.dumps(metrics, indent=2))


@main.command("search")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="length-adaptive checkpoint (toolchain train-lat)")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="dev set (default: packaged slice)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="folder for pareto.json, pareto.png and the evaluation caches (search and report split)")
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
@click.option("--cost", type=click.Choice(["padded", "real"]), default="padded", show_default=True,
              help="padded: MACs at max_seq_length (LAT's); real: mean MACs over the search split's inputs, each cut "
                   "to its real length, as the graphs run them")
@click.option("--choose-tolerance", type=float, default=1.0, show_default=True,
              help="chosen = cheapest frontier point within this many points of full length (search split)")
@click.option("--target-macs-ratio", type=float, default=None,
              help="chosen = most accurate frontier point at or below this share of full MACs (search split)")
@click.option("--select-examples", type=click.IntRange(min=0), default=0, show_default=True,
              help="with --target-macs-ratio: re-score the best candidates at the target on this many further dev "
                   "examples (after the report split) and choose on search + selection examples together")
@click.option("--select-top", type=POSITIVE, default=5, show_default=True,
              help="how many candidates at the target the selection split re-scores")
@click.option("--max-seq-length", type=POSITIVE, default=None,
              help="sequence length to search, cost and later export at (default: the checkpoint's)")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--engine", default="auto", type=click.Choice(["auto", "ort", "torch"]), show_default=True,
              help="what scores candidates: ONNX Runtime graphs (auto on CPU) or PyTorch (auto on CUDA)")
@_guard_option
@click.option("--resume", is_flag=True, help="continue an interrupted search (cached evaluations are reused)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
def search_cmd(model_dir, eval_data, out_dir, search_examples, report_examples, choose_tolerance, target_macs_ratio,
               select_examples, select_top, max_seq_length, batch_size, device, engine, resume, force, **kw):
    """Evolutionary search for Pareto-best length configurations (accuracy vs MACs)."""
    from toolchain.models import read_meta
    from toolchain.search import SearchConfig, search

    task = read_meta(model_dir).get("task", "squad")
    result = search(model_dir=model_dir, eval_path=eval_data or _default_data(task, "dev"), out_dir=out_dir,
                    search_examples=search_examples, report_examples=report_examples, cfg=SearchConfig(**kw),
                    device_name=device, choose_tolerance=choose_tolerance, batch_size=batch_size, resume=resume,
                    force=force, target_macs_ratio=target_macs_ratio, max_seq_length=max_seq_length, engine=engine,
                    select_examples=select_examples, select_top=select_top)
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


@main.command("export")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="fine-tuned or train-lat checkpoint")
@click.option("--length-cfg", "length_cfgs", multiple=True,
              help='tokens kept per layer, e.g. "315,251,242,159,142,33", or "full" (repeatable)')
@click.option("--pareto", type=click.Path(path_type=Path), default=None,
              help="pareto.json from toolchain search: export full + every frontier configuration")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="bundle folder, e.g. graphs/NAME")
@click.option("--max-seq-length", type=POSITIVE, default=None, help="default: the checkpoint's")
@click.option("--optimize", type=click.Choice(["auto", "none", "ort-basic", "ort-extended", "fusion"]), default="auto",
              show_default=True, help="auto: measure the variants on the first graph, keep the fastest that passes parity")
@click.option("--force", is_flag=True, help="replace an existing bundle")
@_guard_option
def export_cmd(model_dir, length_cfgs, pareto, out_dir, max_seq_length, optimize, force, protect_answers):
    """Export one ONNX graph per length configuration into a verified, self-contained bundle."""
    from toolchain.bundle import load_manifest
    from toolchain.export import export, export_pareto

    if bool(length_cfgs) == bool(pareto):
        raise ToolchainError("give --length-cfg (repeatable) or --pareto, not both and not neither")
    out = (export_pareto(model_dir, pareto, out_dir, max_seq_length, force, optimize, protect_answers) if pareto
           else export(model_dir, out_dir, list(length_cfgs), max_seq_length, force, optimize, protect_answers))
    for g in load_manifest(out, verify=False)["graphs"]:
        click.echo(f"{g['name']}\t{g['macs'] / 1e9:.3f} GMACs\t{g['optimization']['method']}")
    click.echo(out)


@main.command("train-geep")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="HF model folder to start from (default: the packaged MiniLM-L6-H384)")
@click.option("--train-data", type=click.Path(path_type=Path), default=None, help="TSV/CSV (default: SST-2 slice)")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="TSV/CSV (default: SST-2 slice)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--max-seq-length", type=POSITIVE, default=128, show_default=True)
@click.option("--depth-weights", default=None, help="teacher loss weight per depth, comma separated (default: proportional to depth)")
@click.option("--student-weight", type=float, default=1.0, show_default=True)
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="how the exit classifier pools the token states")
@_train_options
@_columns_options
def train_geep_cmd(model_dir, train_data, eval_data, out_dir, max_seq_length, depth_weights, student_weight, pooling,
                   text_columns, label_column, header, **kw):
    """GEEP: one-step training of a shared exit classifier (teacher) and per-layer students."""
    from toolchain.data.prepare import Columns
    from toolchain.geep import train_geep

    weights = None
    if depth_weights:
        try:
            weights = [float(w) for w in depth_weights.split(",")]
        except ValueError:
            raise ToolchainError(f"--depth-weights must be comma-separated numbers, got {depth_weights!r}") from None
    cfg = _train_config(kw)
    metrics = train_geep(model_dir=model_dir, train_path=train_data or _default_data("classify", "train"),
                         eval_path=eval_data or _default_data("classify", "dev"), out_dir=out_dir,
                         columns=Columns.parse(text_columns, label_column, header), max_seq_length=max_seq_length,
                         max_train_examples=kw["max_train_examples"], max_eval_examples=kw["max_eval_examples"],
                         cfg=cfg, device_name=kw["device"], resume=kw["resume"], force=kw["force"],
                         depth_weights=weights, student_weight=student_weight, pooling=pooling)
    click.echo(json.dumps(metrics, indent=2))


@main.command("bench-geep")
@click.option("--model", "checkpoint_dir", type=click.Path(path_type=Path), required=True, help="GEEP checkpoint")
@click.option("--train-data", type=click.Path(path_type=Path), default=None, help="builds the exit table")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None)
@click.option("--speeds", default="0.1,0.2,0.3,0.4,0.5", show_default=True, help="entropy thresholds to sweep")
@click.option("--batch", default="1,32,128", show_default=True)
@click.option("--max-train-examples", type=POSITIVE, default=None)
@click.option("--max-eval-examples", type=POSITIVE, default=None)
@_exit_table_options
@click.option("--backend", type=click.Choice(["torch", "ort"]), default="ort", show_default=True)
@click.option("--device", default="cpu", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="folder for results.json, the accuracy-vs-throughput PNG, table and graphs")
def bench_geep_cmd(checkpoint_dir, train_data, eval_data, speeds, batch, max_train_examples, max_eval_examples,
                   aggregation, tune_for, tolerance, tune_data, backend, device, out_dir):
    """Throughput and accuracy of GEEP vs full depth vs FastBERT-style exit, across speeds and batch sizes."""
    from toolchain.geep_runtime import sweep_geep

    try:
        speed_list = [float(v) for v in speeds.split(",")]
    except ValueError:
        raise ToolchainError(f"--speeds must be comma-separated numbers, got {speeds!r}") from None
    report = sweep_geep(checkpoint_dir=checkpoint_dir, train_path=train_data or _default_data("classify", "train"),
                        eval_path=eval_data or _default_data("classify", "dev"), speeds=speed_list,
                        batches=_int_list(batch, "--batch"), out_dir=out_dir, max_train_examples=max_train_examples,
                        max_eval_examples=max_eval_examples, aggregation=aggregation, tune_for=tune_for,
                        tolerance=tolerance, tune_path=tune_data, backend=backend, device_name=device)
    click.echo(json.dumps(report["summary"], indent=2))


@main.command("export-geep")
@click.option("--model", "checkpoint_dir", type=click.Path(path_type=Path), required=True, help="GEEP checkpoint")
@click.option("--speed", type=float, required=True,
              help="entropy threshold in [0, 1] of the FastBERT exits the exit table is fit on (as in bench-geep)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="bundle folder, e.g. graphs/NAME")
@click.option("--train-data", type=click.Path(path_type=Path), default=None,
              help="builds the exit table (default: SST-2 slice)")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="parity rows and manifest metrics (default: SST-2 slice)")
@click.option("--max-train-examples", type=POSITIVE, default=None)
@click.option("--max-eval-examples", type=POSITIVE, default=None)
@_exit_table_options
@click.option("--force", is_flag=True, help="replace an existing bundle")
def export_geep_cmd(checkpoint_dir, speed, out_dir, train_data, eval_data, max_train_examples, max_eval_examples,
                    aggregation, tune_for, tolerance, tune_data, force):
    """Export a GEEP checkpoint's per-depth graphs and exit predictor into a verified bundle."""
    from toolchain.bundle import load_manifest
    from toolchain.geep_export import export_geep_bundle

    eval_data = eval_data or _default_data("classify", "dev")
    out = export_geep_bundle(checkpoint_dir, train_data or _default_data("classify", "train"), eval_data, out_dir,
                             speed, max_train_examples, max_eval_examples, aggregation, tune_for, tolerance, tune_data,
                             force)
    if aggregation == "auto" and tune_data is not None and tune_data.resolve() == Path(eval_data).resolve():
        click.echo("warning: the exit table was tuned on the eval data, so the predictor's accuracy below is "
                   "measured on the rows it was tuned on", err=True)
    for g in load_manifest(out, verify=False)["graphs"]:
        m = g["metrics"]
        click.echo(f"{g['name']}\t{g['macs'] / 1e9:.3f} GMACs\taccuracy {m['accuracy']:.2f}" + (
            f"\texit accuracy {m['exact']:.1f} (within 1: {m['within_1']:.1f}), mean exit {m['mean_exit']:.2f}"
            if g["kind"] == "geep-predictor" else ""))
    click.echo(out)


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ToolchainError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ToolchainError(f"{name} must be positive integers, got {text!r}")
    return values


def _check_writable(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and not os.access(Path(path).parent if Path(path).parent != Path("") else Path("."), os.W_OK):
            raise ToolchainError(f"cannot write {path}: its folder does not exist or is not writable")


@main.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True)
@click.option("--batch", default="1,32", show_default=True, help="batch sizes, comma separated")
@click.option("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
@click.option("--repeats", type=POSITIVE, default=10, show_default=True, help="timed runs per measurement at batch <= 4")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="keep timing each measurement at least this long")
@click.option("--rounds", type=POSITIVE, default=4, show_default=True,
              help="time all measurements round-robin in this many slices (drift hits every row alike)")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="ORT worker threads spin between parallel sections (for a dedicated machine; recorded)")
@click.option("--keep-freed-memory/--no-keep-freed-memory", default=True, show_default=True,
              help="glibc's malloc keeps freed memory within each slice, as the "
                   "caching allocators PyTorch's CPU tuning guide recommends do: PyTorch rows then stop faulting in "
                   "their activations on every run (recorded)")
@click.option("--graphs", default=None, help="only these graph names, comma separated")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", "markdown_out", type=click.Path(path_type=Path), default=None)
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None, help="folder for the PNG plots")
@click.option("--no-torch", is_flag=True, help="skip the PyTorch eager rows")
@click.option("--no-reference", is_flag=True, help="skip the BERT-base reference")
@click.option("--compare", "compare_path", type=click.Path(path_type=Path), default=None,
              help="an earlier bench JSON: report how much every speedup ratio moved (stability check)")
@click.option("--stability-tolerance", type=float, default=0.10, show_default=True,
              help="with --compare: the largest relative change of a speedup ratio accepted")
def bench(bundle_dir, batch, threads, repeats, min_seconds, rounds, spin, keep_freed_memory, graphs, json_out, markdown_out,
          plots_dir, no_torch, no_reference, compare_path, stability_tolerance):
    """ORT vs PyTorch latency of every graph in a bundle, with BERT-base as the reference (Table 1)."""
    from toolchain.bench import bench_bundle, compare_reports, size_note, speedup_table, write_outputs

    batches = _int_list(batch, "--batch")
    _check_writable(json_out, markdown_out)
    previous = None
    if compare_path is not None:
        try:
            previous = json.loads(compare_path.read_text(encoding="utf-8"))
            previous["results"], previous["reference"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ToolchainError(f"--compare {compare_path} is not a readable bench JSON ({type(e).__name__}: {e})") from None
        if no_reference or not previous["reference"]:
            raise ToolchainError("--compare needs the BERT-base reference in both runs (its PyTorch row is the base)")
    report = bench_bundle(bundle_dir, batches, threads, repeats, not no_torch, not no_reference,
                          graphs.split(",") if graphs else None, min_seconds, rounds, spin, keep_freed_memory)
    if previous is not None:
        report["stability"] = {"previous": str(compare_path),
                               **compare_reports(previous, report, stability_tolerance)}
    write_outputs(report, json_out, markdown_out, plots_dir)
    for b in batches:
        click.echo(f"batch {b}\n" + speedup_table(report, b))
    click.echo(size_note(report))
    if previous is not None:
        st, worst = report["stability"], report["stability"]["worst"]
        click.echo(f"stability vs {compare_path}: {st['compared']} speedup ratios, largest change "
                   f"{100 * st['max_abs_change']:.1f}% ({worst['graph']} {worst['engine']} {worst['precision']} "
                   f"b{worst['batch']}); {len(st['unstable'])} over {100 * stability_tolerance:g}%, "
                   f"{st['unstable_within_noise']} of them within their own slices' spread")
        if st["unstable"]:
            raise ToolchainError(f"{len(st['unstable'])} speedup ratios moved more than {100 * stability_tolerance:g}% "
                                 "between the two runs (see 'stability' in the JSON)")


@main.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True)
@click.option("--graph", required=True, help="the graph's name in the bundle, e.g. lat-full, or chosen (the search's choice)")
@click.option("--int8", is_flag=True, help="the INT8 CPU graph quantized from --graph")
@click.option("--batch", type=POSITIVE, default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
@click.option("--repeats", type=POSITIVE, default=10, show_default=True, help="timed and profiled runs per engine")
@click.option("--rounds", type=POSITIVE, default=4, show_default=True,
              help="time the engines round-robin in this many slices (as in bench)")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="ORT worker threads spin between parallel sections (as in bench)")
@click.option("--keep-freed-memory/--no-keep-freed-memory", default=True, show_default=True,
              help="glibc's malloc keeps freed memory, so PyTorch does not fault its activations in on every run")
@click.option("--no-torch", is_flag=True, help="profile the ORT graph alone")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="PNG: time by category")
def profile(bundle_dir, graph, int8, batch, threads, repeats, rounds, spin, keep_freed_memory, no_torch, json_out,
            plot_out):
    """Where one graph's time goes: ORT's per-op profile next to PyTorch eager's at the same configuration."""
    from toolchain.profile import profile_graph, profile_table, write_report

    _check_writable(json_out, plot_out)
    report = profile_graph(bundle_dir, graph, batch, threads, repeats, torch_eager=not no_torch, spinning=spin,
                           keep_memory=keep_freed_memory, rounds=rounds, int8=int8)
    write_report(report, json_out, plot_out)
    click.echo(f"{report['graph']}, batch {batch}, seq {report['seq_length']}, {report['machine']['threads']} threads\n"
               + profile_table(report))


@main.command("quantize")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True)
@click.option("--calib-data", type=click.Path(path_type=Path), required=True,
              help="the task's train data (SQuAD .json[.gz] or TSV/CSV); calibration runs at each graph's own length")
@click.option("--eval-data", type=click.Path(path_type=Path), required=True, help="held-out dev data for the accuracy check")
@click.option("--graphs", multiple=True,
              help="fp32 graph names to quantize, comma separated or repeated; 'chosen' = the search's choice (default: all)")
@click.option("--calib-samples", type=POSITIVE, default=300, show_default=True)
@click.option("--eval-examples", type=POSITIVE, default=None, help="dev examples for the accuracy check (default: all)")
@click.option("--eval-skip", type=click.IntRange(min=0), default=0, show_default=True,
              help="skip this many examples of the seeded dev permutation first (e.g. the search split)")
@click.option("--tolerance", type=float, default=1.0, show_default=True, help="allowed drop vs the fp32 graph, in points")
@click.option("--ep", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: U8S8 QOperator (VNNI); cuda: S8S8 QDQ")
@click.option("--max-trials", type=POSITIVE, default=3, show_default=True, help="tuning trials (each keeps more ops in fp32)")
@click.option("--reduce-range/--full-range", default=None,
              help="7-bit weights, exact on CPUs without VNNI/AMX (default: only on an x86 CPU with neither)")
@click.option("--seed", type=int, default=0, show_default=True)
def quantize_cmd(bundle_dir, calib_data, eval_data, graphs, calib_samples, eval_examples, eval_skip, tolerance, ep,
                 max_trials, reduce_range, seed):
    """Static INT8 (Neural Compressor) of a bundle's graphs, accuracy-aware, added to the bundle."""
    from toolchain.quantize import quantize_bundle

    names = [g for value in graphs for g in value.split(",") if g]
    for e in quantize_bundle(bundle_dir, calib_data, eval_data, names or None, calib_samples, eval_examples,
                             tolerance, ep, seed, max_trials, eval_skip=eval_skip, reduce_range=reduce_range):
        q, m = e["quantization"], e["quantization"]["metric"]
        click.echo(f"{e['name']}: {m} {e['metrics'][m]:.2f} (fp32 {e['metrics']['fp32'][m]:.2f}); {q['fallback']} for: "
                   f"{', '.join(q['fallback_units']) or 'none'}; {q['size_ratio']:.0%} of fp32 size; {q['seconds']:.0f} s")


def _selection_options(f):
    """--bundle, the policy (at most one of --budget-ms, --min-f1, --max-macs), --batch, --ep, --threads."""
    for option in reversed((
        click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True),
        click.option("--budget-ms", type=float, default=None,
                     help="latency budget per batch: the most accurate graph that fits (else the fastest, with a warning)"),
        click.option("--min-f1", type=float, default=None,
                     help="accuracy floor (F1, or accuracy for classification, percent): the fastest graph reaching it"),
        click.option("--max-macs", type=float, default=None, help="MAC budget: the most accurate graph within it"),
        click.option("--batch", type=POSITIVE, default=1, show_default=True,
                     help="rows per graph run; latencies are compared at this batch size"),
        click.option("--ep", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="execution provider; auto uses CUDA only when it works"),
        click.option("--threads", type=POSITIVE, default=None, help="intra-op threads (default: all cores)"),
    )):
        f = option(f)
    return f


def _report(selection) -> None:
    for note in selection.notes:
        click.echo(f"note: {note}", err=True)
    if not selection.fits:
        click.echo(f"warning: {selection.reason}", err=True)


@main.command("select")
@_selection_options
@click.option("--json", "as_json", is_flag=True, help="print the choice and every candidate (latency, accuracy, why rejected)")
def select_cmd(bundle_dir, budget_ms, min_f1, max_macs, batch, ep, threads, as_json):
    """Pick a bundle's graph for a budget on this machine; latencies the manifest lacks are probed once and cached."""
    from toolchain.runtime import Bundle, explain

    selection = Bundle.load(bundle_dir, ep, threads=threads).select(budget_ms, min_f1, max_macs, batch)
    _report(selection)
    click.echo(json.dumps(explain(selection), indent=2) if as_json else f"{selection.entry['name']}: {selection.reason}")


@main.command()
@_selection_options
@click.option("--question", default=None)
@click.option("--context", default=None)
@click.option("--requests", "requests_path", type=click.Path(path_type=Path), default=None,
              help='JSON Lines (UTF-8): {"question", "context"} per line; classification: {"text"[, "text_pair"]}')
def predict(bundle_dir, budget_ms, min_f1, max_macs, batch, ep, threads, question, context, requests_path):
    """Answer with the graph selected for the budget: one JSON object per request and line on stdout.

    GEEP bundles (export-geep) answer each request at its predicted exit depth; they take no budget."""
    from toolchain.runtime import PREDICTORS, Bundle, GeepPredictor, QAPredictor, is_geep, read_requests

    bundle = Bundle.load(bundle_dir, ep, threads=threads)
    geep = is_geep(bundle)
    if geep and (budget_ms, min_f1, max_macs) != (None, None, None):
        raise ToolchainError(f"{bundle_dir} is a GEEP bundle: each request's depth is predicted, it takes no budget")
    cls = GeepPredictor if geep else PREDICTORS[bundle.task]
    if requests_path is not None:
        if question is not None or context is not None:
            raise ToolchainError("give --question/--context or --requests, not both")
        items = read_requests(requests_path, cls.FIELDS, cls.REQUIRED)
    elif cls is not QAPredictor:
        raise ToolchainError(f"{bundle_dir} is a classification bundle: give --requests FILE.jsonl")
    elif not (question and context):
        raise ToolchainError("give --question and --context, or --requests FILE.jsonl")
    else:
        items = [(question, context)]
    if geep:
        predictor = GeepPredictor(bundle, batch)
        for note in predictor.notes:
            click.echo(f"note: {note}", err=True)
    else:
        predictor = cls(bundle, budget_ms, min_f1, max_macs, batch)
        _report(predictor.selection)
    for start in range(0, len(items), 64):
        for answer in predictor.predict_batch(items[start:start + 64]):
            click.echo(json.dumps(answer))


@main.command("verify")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True, help="a QA bundle")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="length-adaptive checkpoint the bundle came from (default: the manifest's source_checkpoint)")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="SQuAD dev .json[.gz] (default: packaged slice)")
@click.option("--examples", type=int, default=200, show_default=True, help="dev questions per graph")
@click.option("--skip", type=int, default=0, show_default=True, help="skip this many of the seeded dev permutation first")
@click.option("--graphs", default=None, help="graphs to compare with PyTorch, comma separated (default: all)")
@click.option("--tolerance", type=float, default=1.0, show_default=True,
              help="int8: allowed F1 drop vs PyTorch fp32, in points, where the manifest records none")
@click.option("--budget-ms", type=float, default=None,
              help="concurrency check: serve the graph selected for this budget (default: the most accurate)")
@click.option("--requests", type=int, default=100, show_default=True, help="requests each concurrent caller sends")
@click.option("--threads", type=int, default=8, show_default=True, help="concurrent callers")
@click.option("--ep", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="write the full report here")
def verify_cmd(bundle_dir, model_dir, eval_data, examples, skip, graphs, tolerance, budget_ms, requests, threads, ep,
               json_out):
    """Check a QA bundle's runtime: selection vs brute force, answers vs PyTorch, concurrent callers."""
    from toolchain.runtime import Bundle
    from toolchain.verify import summary, verify

    _check_writable(json_out)
    report = verify(Bundle.load(bundle_dir, ep), model_dir, eval_data or _default_data("squad", "dev"), examples, skip,
                    [g for g in graphs.split(",") if g] if graphs else None, tolerance, budget_ms, requests, threads)
    click.echo(summary(report))
    _write_json(json_out, report)
    if report["failed"]:
        raise ToolchainError(f"verification failed: {', '.join(report['failed'])}"
                             + (f" (report: {json_out})" if json_out else ""))


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--only", multiple=True, help="run only steps of this command (repeatable)")
def run_cmd(recipe, only):
    """Run a YAML pipeline recipe; finished steps are skipped, interrupted ones resumed."""
    from toolchain.recipe import run_recipe

    run_recipe(recipe, main, only)


def _write_json(path: Path | None, obj) -> None:
    """Write JSON atomically when a path was given."""
    if path is not None:
        write_json(path, obj)


if __name__ == "__main__":
    main()
