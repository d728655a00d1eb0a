"""``ditc run RECIPE.yaml``: a list of subcommand steps chained through one run directory.

Recipe format::

    name: quickstart
    vars: {base: digits-dit, steps: 300}        # ${steps} anywhere below; override: steps=50
    steps:
      - name: prune                             # output: RUN_DIR/prune
        command: prune-depth
        args: {source: "${base}", pattern: "1:2", data: digits, steps: "${steps}"}
      - name: kd
        command: distill
        args: {source: "@prune", teacher: "${base}", data: digits}   # @prune = RUN_DIR/prune

Everything is checked before the first step runs (unknown commands, options a command
does not take or values of the wrong type, references to steps that do not come earlier,
step names that are not plain names, outputs outside the run directory or shared by two
steps). A step is finished when its output is complete and the record the run dir keeps of
it (``.ditc-steps/NAME.json``: the command and its resolved options, with the records of the
steps it reads) matches the step as it stands now; a rerun continues at the first unfinished
step. A finished step whose options changed is refused in one line, unless ``force``
recomputes it and the steps that read it. ``resume`` continues a step whose training was
interrupted (its work dir holds the saved state).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import statistics
import time
import typing
from pathlib import Path

import yaml

from . import checks
from .commands import COMMANDS
from .hashing import tree_digest
from .errors import DitcError, UsageError
from .outputs import exclusive, work_dir_for
from .report import plot_with_noise, table_md

VAR_RE = re.compile(r"\$\{([A-Za-z_][\w]*)\}")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
RECORDS = ".ditc-steps"
def recipe_dirs() -> list[Path]:
    """Where built-in recipes are: the repository's top-level ``recipes/`` (a source checkout or
    an editable install), or the same files installed as the package data
    ``dit_compress/recipes`` (a plain ``pip install .``); then ``./recipes`` of the current
    directory."""
    here = Path(__file__).resolve().parent
    dirs = [here / "recipes"]  # installed from a wheel
    if (here.parent / "pyproject.toml").exists():
        dirs.append(here.parent / "recipes")  # the source tree
    return dirs + [Path.cwd() / "recipes"]


def builtin_recipes() -> dict[str, Path]:
    out = {}
    for d in recipe_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return out


def recipe_table() -> dict[str, dict]:
    """The built-in recipes, parsed, by name."""
    return {name: parse_yaml(path) or {} for name, path in builtin_recipes().items()}


def load_recipe(path_or_name: str) -> tuple[dict, Path]:
    p = Path(path_or_name)
    if not p.is_file():  # a directory of that name (e.g. an earlier run dir 'quickstart/') is not a recipe
        known = builtin_recipes()
        if path_or_name in known:
            p = known[path_or_name]
        else:
            raise UsageError(f"no recipe {path_or_name!r} (not a file; built-in: {', '.join(known) or 'none'})")
    recipe = parse_yaml(p)
    _check_plain(recipe, p)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("steps"), list) or not recipe["steps"]:
        raise UsageError(f"recipe {p} needs a non-empty 'steps' list")
    for i, st in enumerate(recipe["steps"]):
        if not isinstance(st, dict):
            raise UsageError(f"recipe {p}: step {i + 1} must be a mapping (name:, command:, args:), got {st!r}"[:200])
    if "name" in recipe:
        name = recipe["name"]
        if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
            raise UsageError(f"recipe {p}: its name {name!r} must be a plain name (letters, digits, '_', '-', '.'; "
                             "no '/', no '..'): it names the run directory runs/NAME"[:240])
    return recipe, p


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of text
MAX_DEPTH = 32


class _PlainLoader(yaml.SafeLoader):  # resolvers below: YAML 1.1's base-60 numbers ("1:2" -> 62) and dates stay text
    """YAML as plain data, judged while it is parsed: aliases refused (an alias bomb expands a
    few hundred bytes into billions of nodes), nesting deeper than ``MAX_DEPTH`` refused at the
    level where it happens (before Python's recursion limit)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UsageError(f"recipe {self.name} uses a YAML alias (*{event.anchor}, line {event.start_mark.line + 1}); "
                             "write the value out")
        self.depth = getattr(self, "depth", 0) + 1
        if self.depth > MAX_DEPTH:
            raise UsageError(f"recipe {self.name} nests deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_PlainLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                                                             "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_PlainLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                   list("-+0123456789"))
_PlainLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
PLAIN = (str, int, float, bool, type(None))


def parse_yaml(p: Path):
    """A recipe file's YAML: at most ``MAX_RECIPE_BYTES`` read, aliases and deep nesting refused."""
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise UsageError(f"recipe {p} is larger than {MAX_RECIPE_BYTES >> 10} KB; a recipe is a page of text")
        text = raw.decode("utf-8")
        loader = _PlainLoader(text)
        loader.name = str(p)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"recipe {p} cannot be read as text: {str(e)[:120]}") from None
    except RecursionError:
        raise UsageError(f"recipe {p} nests too deeply to parse") from None


def _check_plain(value, where, depth: int = 0) -> None:
    """YAML as plain data: text keys, bounded nesting (a self-referencing alias is refused)."""
    if depth > 32:
        raise UsageError(f"recipe {where} nests deeper than 32 levels (a self-referencing YAML alias?)")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UsageError(f"recipe {where}: key {k!r} must be text (quote it)"[:200])
            _check_plain(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_plain(v, where, depth + 1)
    elif not isinstance(value, PLAIN):
        raise UsageError(f"recipe {where}: {type(value).__name__} value {str(value)[:40]!r} is not plain text, a "
                         "number or a flag (quote it)")


def _subst(value, variables: dict):
    if isinstance(value, str):
        full = VAR_RE.fullmatch(value)
        if full:
            if full.group(1) not in variables:
                raise UsageError(f"recipe uses ${{{full.group(1)}}} but defines no such variable")
            return variables[full.group(1)]

        def rep(m):
            if m.group(1) not in variables:
                raise UsageError(f"recipe uses ${{{m.group(1)}}} but defines no such variable")
            return str(variables[m.group(1)])

        return VAR_RE.sub(rep, value)
    if isinstance(value, list):
        return [_subst(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, variables) for k, v in value.items()}
    return value


def _parse_override(text: str):
    if "=" not in text:
        raise UsageError(f"override {text!r} must look like key=value or step.option=value")
    k, v = text.split("=", 1)
    try:  # numbers, true/false, lists; anything else (e.g. "1:2", which YAML 1.1 reads as 62) stays text
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def resolve(recipe: dict, overrides: list[str]) -> dict:
    """Substitute variables and apply ``key=value`` / ``step.option=value`` overrides."""
    if recipe.get("vars") is not None and not isinstance(recipe["vars"], dict):
        raise UsageError("recipe 'vars' must be a mapping of name: value")
    variables = dict(recipe.get("vars") or {})
    step_over: dict[str, dict] = {}
    names = [s.get("name") for s in recipe["steps"]]
    for o in overrides:
        k, v = _parse_override(o)
        if "." in k and k.split(".", 1)[0] in names:
            step, opt = k.split(".", 1)
            if step not in names:
                raise UsageError(f"override {o!r}: no step named {step!r} (steps: {', '.join(map(str, names))})")
            step_over.setdefault(step, {})[opt.replace("-", "_")] = v
        else:
            if k not in variables:
                raise UsageError(f"override {o!r}: the recipe has no variable {k!r} (variables: {', '.join(variables) or 'none'})")
            variables[k] = v
    steps = []
    for s in recipe["steps"]:
        if not isinstance(s, dict) or "name" not in s or "command" not in s:
            raise UsageError("every recipe step needs a 'name' and a 'command'")
        check_step_name(s["name"])
        if not isinstance(s["command"], str):
            raise UsageError(f"step {s['name']!r}: 'command' must be a command name, got {s['command']!r}")
        if s.get("args") is not None and not isinstance(s["args"], dict):
            raise UsageError(f"step {s['name']!r}: 'args' must be a mapping of option: value")
        args = dict(s.get("args") or {})
        args.update(step_over.get(s["name"], {}))
        steps.append({"name": s["name"], "command": s["command"], "args": _subst(args, variables)})
    return {"name": recipe.get("name", "recipe"), "description": recipe.get("description", ""), "vars": variables, "steps": steps}


ALIASES = {"prune-depth": {"candidates": "num_candidates"}}  # option spellings accepted for parameter names
INTERNAL = {"echo"}  # library parameters a recipe does not set


def _params(command: str) -> dict[str, inspect.Parameter]:
    fn = COMMANDS[command]
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n not in INTERNAL}


def _ref(value, outputs: dict, step: str):
    if isinstance(value, str) and value.startswith("@"):
        ref = value[1:]
        if ref not in outputs:
            raise UsageError(f"step {step!r} refers to @{ref}, which is not an earlier step of the recipe")
        return str(outputs[ref])
    if isinstance(value, list):
        return [_ref(v, outputs, step) for v in value]
    return value


def check_step_name(name) -> str:
    """A step name is its output's directory name: plain text, no path, no '.' or '..'."""
    if not isinstance(name, str):
        raise UsageError(f"step name {name!r} must be text (quote it in the YAML: name: \"{name}\")")
    if not NAME_RE.match(name) or name in (".", "..") or ".." in name:
        raise UsageError(f"step name {name!r} must be a plain name (letters, digits, '_', '-', '.'; no '/', no '..')")
    return name


SCALARS = (int, float, bool, str)


def _coerce(value, hint, key: str, step: str):
    """Text given for a number or a flag (e.g. from an override) becomes that type; a list or
    a mapping given for a single value is refused here, before any step runs."""
    allowed = typing.get_args(hint) or (hint,)
    if isinstance(value, (list, dict)) and allowed and all(t in SCALARS or t is type(None) or t is Path
                                                           for t in allowed):
        raise UsageError(f"step {step!r}: option {key!r} takes a single value, got {value!r}"[:200])
    kinds = [t for t in allowed if t in (int, float, bool)]
    if not isinstance(value, str) or not kinds or str in allowed:
        return value
    kind = kinds[0]
    try:
        if kind is bool:
            return {"true": True, "false": False}[value.lower()]
        return kind(value)
    except (KeyError, ValueError):
        raise UsageError(f"step {step!r}: option {key!r} takes a {kind.__name__}, got {value!r}") from None


def bind(step: dict, outputs: dict, run_dir: Path) -> dict:
    """One step's keyword arguments for its library function, every option name checked."""
    name, command = step["name"], step["command"]
    if command in ("run", "recipes"):
        raise UsageError(f"step {name!r}: a recipe cannot run {command!r}")
    if command not in COMMANDS:
        raise UsageError(f"step {name!r}: unknown command {command!r} (commands: {', '.join(sorted(COMMANDS))})")
    params, aliases = _params(command), ALIASES.get(command, {})
    hints = typing.get_type_hints(COMMANDS[command])
    args = {aliases.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in step["args"].items()
            if k.replace("-", "_") not in ("json", "json_out")}
    if "output" in params:
        args["output"] = str(confined_output(run_dir, name, args.get("output")))
    for key in args:
        if key not in params:
            raise UsageError(f"step {name!r}: {command} takes no option {key!r} (it takes: {', '.join(sorted(params))})")
    bound = {k: _coerce(_ref(v, outputs, name), hints.get(k), k, name) for k, v in args.items()}
    for k, v in bound.items():  # the shared bounds, so a bad value stops the run before its first step
        try:
            checks.option(k, v)
        except UsageError as e:
            raise UsageError(f"step {name!r}: {e}") from None
    return bound


def confined_output(run_dir: Path, name: str, given) -> Path:
    """A step's output: ``RUN_DIR/NAME``, or the ``output`` it gives, relative to the run dir
    and inside it (never the run dir itself, never outside it)."""
    root = Path(os.path.realpath(run_dir))
    if given is None:
        return root / name
    if not isinstance(given, str) or not given.strip():
        raise UsageError(f"step {name!r}: 'output' must be a path inside the run directory, got {given!r}")
    target = Path(os.path.realpath(root / given))
    if target == root or root not in target.parents:
        raise UsageError(f"step {name!r}: output {given!r} is not inside the run directory {run_dir} "
                         "(recipe outputs stay in their run)")
    return target


def step_finished(run_dir: Path, name: str, output: Path | None = None) -> bool:
    """Outputs appear atomically when complete (a file, or a dir with its report)."""
    out = Path(output) if output is not None else run_dir / name
    return out.is_file() or (out / "report.json").exists() or (out / "model_index.json").exists()


def _nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def plan(recipe: dict, run_dir: Path) -> list[tuple[dict, dict]]:
    """Every step bound to its arguments before anything runs; outputs checked for collisions."""
    outputs, out, written = {}, [], {}
    for step in recipe["steps"]:
        if step["name"] in outputs:
            raise UsageError(f"two steps are named {step['name']!r}")
        kwargs = bind(step, outputs, run_dir)
        target = Path(kwargs["output"]) if kwargs.get("output") is not None else None
        if target is not None:
            clash = next((n for n, o in written.items() if _nested(o, target)), None)
            if clash is not None:
                raise UsageError(f"steps {clash!r} and {step['name']!r} write the same output (or one inside the other): "
                                 f"{target}")
            written[step["name"]] = target
        outputs[step["name"]] = target if target is not None else run_dir / step["name"]
        out.append((step, kwargs))
    return out


def fingerprints(steps: list[tuple[dict, dict]]) -> dict[str, str]:
    """Per step: a hash of its command and resolved options, where an option that names an
    earlier step's output stands for that step's own fingerprint (so a change upstream
    changes every step that reads it) and one that names another local file or folder stands
    for every byte of it (a model replaced at the same path is another input)."""
    out, by_output = {}, {}
    for step, kwargs in steps:
        reads = set(getattr(COMMANDS[step["command"]], "reads", ()))

        def norm(v, read: bool):
            if isinstance(v, list):
                return [norm(x, read) for x in v]
            if isinstance(v, str) and v in by_output:
                return {"step": by_output[v]}
            if read and isinstance(v, str) and v.strip():  # an input the command reads: by its contents
                try:
                    return {"path": v, "content": tree_digest(v)} if Path(v).exists() else v
                except OSError:
                    return v
            return v

        body = {"command": step["command"],
                "args": {k: norm(v, k in reads) for k, v in sorted(kwargs.items()) if k != "output"}}
        fp = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:20]
        out[step["name"]] = fp
        if kwargs.get("output") is not None:
            by_output[str(kwargs["output"])] = fp
    return out


def _record_path(run_dir: Path, name: str) -> Path:
    return run_dir / RECORDS / f"{name}.json"


def _read_record(run_dir: Path, name: str) -> dict:
    try:
        rec = json.loads(_record_path(run_dir, name).read_bytes()[: 1 << 20])
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _recorded(run_dir: Path, name: str) -> str | None:
    return _read_record(run_dir, name).get("fingerprint")


def _record(run_dir: Path, step: dict, kwargs: dict, fp: str, seconds: float) -> None:
    path = _record_path(run_dir, step["name"])
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, "command": step["command"], "args": kwargs, "seconds": seconds},
                              indent=2, default=str))
    os.replace(tmp, path)


def _describe_call(command: str, kwargs: dict) -> str:
    return command + " " + " ".join(f"{k}={v}" for k, v in kwargs.items())


def run_step(step: dict, kwargs: dict) -> None:
    try:
        COMMANDS[step["command"]](**kwargs)
    except DitcError as e:
        msg = str(e).replace("pass `resume` to continue it", "rerun with `ditc run --resume` to continue it")
        raise type(e)(f"step {step['name']!r} ({step['command']}): {msg}; fix it and rerun to resume here",
                      exit_code=e.exit_code) from None


def check_run_dir(run_dir) -> Path:
    if run_dir is None or not str(run_dir).strip() or str(run_dir).strip() in (".", "./"):
        raise UsageError(f"run directory {str(run_dir)!r} is empty or '.': give the run its own directory")
    return Path(run_dir)


def run_recipe(path_or_name: str, run_dir: Path | None, overrides: list[str], echo=print, resume: bool = False,
               force: bool = False) -> dict:
    """Run a recipe's steps in order, skipping finished ones; returns the run summary.
    ``resume``: continue steps whose training was interrupted. ``force``: recompute finished
    steps whose options changed (and the steps reading them) instead of refusing."""
    recipe, path = load_recipe(path_or_name)
    resolved = resolve(recipe, overrides)
    run_dir = check_run_dir(run_dir if run_dir is not None else Path("runs") / resolved["name"])
    steps = plan(resolved, run_dir)  # everything is checked before anything runs
    with exclusive(run_dir, "run directory"):  # a second run of the same dir is refused before it writes anything
        return _run(steps, resolved, path, run_dir, echo, resume, force)


def _run(steps, resolved: dict, path: Path, run_dir: Path, echo, resume: bool, force: bool) -> dict:
    prints = fingerprints(steps)
    todo = []
    for step, kwargs in steps:
        out = kwargs.get("output")
        done = out is not None and step_finished(run_dir, step["name"], out)
        if done and _recorded(run_dir, step["name"]) not in (None, prints[step["name"]]):
            if not force:
                raise UsageError(f"step {step['name']!r} finished earlier with other options or inputs than the recipe "
                                 f"now gives; pass `force` to recompute it (and the steps reading it), or use another "
                                 f"run directory")
            done = False
        todo.append((step, kwargs, done))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump({**resolved, "source": str(path)}, sort_keys=False))
    timings = []
    for step, kwargs, done in todo:
        if done:
            echo(f"[{step['name']}] finished earlier, skipped")
            secs = _read_record(run_dir, step["name"]).get("seconds")
            ok = isinstance(secs, (int, float)) and not isinstance(secs, bool) and math.isfinite(secs) and secs >= 0
            timings.append({"step": step["name"], "command": step["command"], "seconds": secs if ok else None,
                            "skipped": True})
            continue
        kwargs = dict(kwargs)
        if kwargs.get("output") is not None:
            out = Path(kwargs["output"])
            if "force" in _params(step["command"]) and out.exists():
                if _recorded(run_dir, step["name"]) is None and not force:
                    raise UsageError(f"step {step['name']!r}: its output {out} exists and this run did not make it; "
                                     "move it away, or pass `force` to replace it")
                kwargs["force"] = True  # this run's own earlier (stale) output of this very step, in the run dir
            if resume and "resume" in _params(step["command"]) and (work_dir_for(out) / "train_state").exists():
                kwargs["resume"] = True
        echo(f"[{step['name']}] {_describe_call(step['command'], kwargs)}")
        before = fingerprints(steps)[step["name"]]  # its inputs as they are now, just before it reads them
        t0 = time.time()
        run_step(step, kwargs)
        seconds = time.time() - t0
        if fingerprints(steps)[step["name"]] != before:
            raise DitcError(f"step {step['name']!r}: a file or folder it reads changed while it ran; its output is not "
                            "recorded as finished: rerun to compute it again")
        if kwargs.get("output") is not None:
            _record(run_dir, step, kwargs, before, seconds)
        timings.append({"step": step["name"], "command": step["command"], "seconds": seconds, "skipped": False})
    return summarize(run_dir, resolved, timings)


def summarize(run_dir: Path, resolved: dict, timings: list[dict]) -> dict:
    """One table over the run: per eval step its metrics, per bench step its rows."""
    evals, benches = [], []
    outputs = {st["name"]: Path(kw["output"]) for st, kw in plan(resolved, run_dir) if kw.get("output") is not None}
    for step in resolved["steps"]:
        rep_file = outputs.get(step["name"], run_dir / step["name"]) / "report.json"
        if not rep_file.exists():
            continue
        rep = json.loads(rep_file.read_text())
        if step["command"] == "eval":
            evals.append({"step": step["name"], "model": rep.get("source"), **rep.get("metrics", {}),
                          "samples": rep.get("num_samples")})
        if step["command"] == "bench":
            for r in rep.get("rows", []):
                benches.append({"step": step["name"], **{k: r[k] for k in ("model", "batch", "gflops", "flops_ratio", "latency_ms", "speedup")}})
    noise = [{"model": m, "seeds": n, "fid_mean": mean, "fid_seed_sd": sd} for m, (mean, sd, n) in fid_noise(evals).items()]
    summary = {"recipe": resolved["name"], "steps": timings, "quality": evals, "fid_noise": noise, "speed": benches}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    md = [f"# Run summary: {resolved['name']}", "", resolved.get("description", ""), "", "## Steps", "", table_md(timings)]
    if evals:
        md += ["## Quality", "", table_md(evals)]
    if noise:
        md += ["FID noise: the same model sampled at several seeds (same N); a FID difference within about "
               "two of these sds is not one.", "", table_md(noise)]
    if benches:
        md += ["## Speed", "", table_md(benches)]
    (run_dir / "summary.md").write_text("\n".join(md) + "\n")
    plot_quality_vs_speed(evals, benches, run_dir / "quality_vs_speed.png")
    return summary


def fid_noise(evals: list[dict]) -> dict[str, tuple[float, float, int]]:
    """Per model evaluated at several seeds (same N): (mean FID, seed-to-seed sd, seeds)."""
    by_model: dict[str, list[float]] = {}
    for e in evals:
        if "frechet_inception_distance" in e:
            by_model.setdefault(str(e["model"]), []).append(float(e["frechet_inception_distance"]))
    return {m: (statistics.mean(v), statistics.stdev(v), len(v)) for m, v in by_model.items() if len(v) > 1}


def plot_quality_vs_speed(evals: list[dict], benches: list[dict], path: Path) -> None:
    """FID against measured speedup (largest benchmarked batch) for models with both, with the
    FID noise: each model's seed-to-seed sd where it was evaluated at several seeds, else the
    most-evaluated model's (the base), drawn as error bars and a band around that model."""
    if not evals or not benches:
        return
    big = max(r["batch"] for r in benches)
    speed = {str(r["model"]): r["speedup"] for r in benches if r["batch"] == big}
    noise = fid_noise(evals)
    ref = max(noise.items(), key=lambda kv: kv[1][2]) if noise else None
    pts, seen = [], set()
    for e in evals:
        m = str(e.get("model"))
        if m in speed and "frechet_inception_distance" in e and m not in seen:
            seen.add(m)
            mean, sd, _ = noise.get(m, (float(e["frechet_inception_distance"]), ref[1][1] if ref else 0.0, 1))
            pts.append((speed[m], mean, sd, e["step"]))
    if not pts:
        return
    band = None
    if ref is not None:
        mean, sd, n = ref[1]
        band = (mean - sd, mean + sd, f"{Path(ref[0]).name} FID \u00b1 1 sd over {n} seeds")
    plot_with_noise(path, pts, band, f"measured speedup (batch {big})", "FID (lower is better)")
