"""`toolchain run RECIPE.yaml`: run a pipeline of toolchain commands, skipping finished steps.

A recipe names a work directory and a list of steps; each step is one toolchain command with its
options. A step whose `out` (or, without one, `json`) already exists is skipped (every command writes
its output atomically, so an existing output is a finished one); an interrupted step is resumed
where the command supports `--resume`. `quantize` skips graphs that already have their INT8 twin.

    workdir: runs/quickstart
    steps:
      - finetune: {task: squad, out: finetuned, max-train-examples: 600}
      - eval: {model: finetuned}

Relative paths under `out`, `model`, `bundle`, `pareto` and the like are taken inside `workdir`;
write `{workdir}` explicitly anywhere else.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from toolchain.errors import ToolchainError

WORKDIR_KEYS = {"out", "model", "bundle", "pareto", "json", "markdown", "plots", "plot", "compare"}


def load_recipe(path: Path) -> dict:
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ToolchainError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("steps"), list) or "workdir" not in recipe:
        raise ToolchainError(f"{path}: a recipe needs 'workdir' and a 'steps' list")
    for i, step in enumerate(recipe["steps"], 1):
        if not (isinstance(step, dict) and len(step) == 1 and isinstance(next(iter(step.values())), dict)):
            raise ToolchainError(f"{path}: step {i} must be one mapping 'command: {{options}}'")
    return recipe


def step_args(options: dict, workdir: Path, negatable: frozenset[str] = frozenset(),
              repeatable: frozenset[str] = frozenset()) -> list[str]:
    """Click arguments for one step's options (True -> flag, False -> `--no-KEY` for the ``negatable`` on/off
    switches and omitted otherwise, lists -> the option once per item for the ``repeatable`` options, whose items
    may hold commas themselves (length configurations), comma-joined for the others)."""
    args = []
    for key, value in options.items():
        if isinstance(value, str):
            value = value.replace("{workdir}", str(workdir))
            if key in WORKDIR_KEYS and not Path(value).is_absolute():
                value = str(workdir / value)
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            if key in negatable:
                args.append(f"--no-{key}")
        elif value is None:
            continue
        elif isinstance(value, list) and key in repeatable:
            args += [a for item in value for a in (f"--{key}", str(item))]
        else:
            args += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args


def option_kinds(command: click.Command) -> tuple[frozenset[str], frozenset[str]]:
    """A command's on/off switches (``--KEY/--no-KEY``) and repeatable options, by recipe key."""
    negatable = frozenset(o[len("--no-"):] for p in command.params for o in getattr(p, "secondary_opts", [])
                          if o.startswith("--no-"))
    repeatable = frozenset(o[len("--"):] for p in command.params if getattr(p, "multiple", False)
                           for o in p.opts if o.startswith("--"))
    return negatable, repeatable


def run_recipe(path: Path, main: click.Group, only: tuple[str, ...] = ()) -> None:
    recipe = load_recipe(path)
    workdir = Path(str(recipe["workdir"]))
    workdir.mkdir(parents=True, exist_ok=True)
    steps = recipe["steps"]
    for i, step in enumerate(steps, 1):
        (name, options), = step.items()
        command = main.get_command(click.Context(main), name)
        if command is None:
            raise ToolchainError(f"{path}: step {i} names unknown command {name!r}")
        args = step_args(options, workdir, *option_kinds(command))
        out = options.get("out", options.get("json"))  # a step's output: its folder, or its JSON report
        label = f"[{i}/{len(steps)}] {name}"
        if only and name not in only:
            continue
        if out and (workdir / str(out)).exists():
            click.echo(f"{label}: {workdir / str(out)} exists, skipped", err=True)
            continue
        if any(p.name == "resume" for p in command.params):
            args.append("--resume")
        click.echo(f"{label}: toolchain {name} {' '.join(args)}", err=True)
        command.main(args, prog_name=f"toolchain {name}", standalone_mode=False)
