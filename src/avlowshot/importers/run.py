"""``import-run``: a reference run folder (the authors' stage-1 and stage-2 checkpoints and saved arguments) ->
an avlowshot run directory that ``avlowshot evaluate`` scores with the reference's protocol (``--compat official``).

What is read (as each reference's own evaluation reads it, specs section "final protocol"):

* the two run folders below ``--ref-dir``, told apart by their saved ``retrain_all`` (False: stage 1, True:
  stage 2), or given with ``--stage-1`` / ``--stage-2``;
* stage 1: the one ``<Model>_score.pt`` (the best validation epoch; its stored ``epoch`` is e);
* stage 2: ``checkpoints/<Model>_score_ckpt_<e-1>.pt`` (AV-DIFF: ``checkpoints{,_1,_2}/``, one per shot repeat),
  the stage-2 model after the same number of epochs;
* the arguments (``args.pkl``, else ``args.yaml``) of both: the model is built from stage 2's, as the reference.

What is written (into a temporary sibling folder, renamed into place at the end; nothing is left behind on an
error): ``run.json`` (with ``compat: official`` and an ``imported`` record: source files and their sha256, the
reference's arguments and what became of each), ``config.yaml``, and per stage ``checkpoints/epoch-<e-1>/``
(safetensors with avlowshot's keys + sidecar) and ``summary.json``.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from avlowshot import __version__
from avlowshot.errors import AvlowshotError, ConfigError
from avlowshot.importers.loading import ARGS_FILES, ReferenceImportError, load_reference_checkpoint, read_run_args
from avlowshot.importers.references import KeyMapError, Reference, guess_reference, map_state_dict, reference
from avlowshot.train import checkpoint as ckpt
from avlowshot.train.config import dump_config, load_config, validate_config

log = logging.getLogger("avlowshot.import")

COMPAT = "official"


# ----------------------------------------------------------------------------------------------------------------
# Finding the two run folders


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ARGS_FILES)


def find_run_dirs(ref_dir: Path) -> list[Path]:
    """Reference run folders (with saved arguments) at ``ref_dir`` or up to two levels below it (``runs/<name>``)."""
    if _is_run_dir(ref_dir):
        return [ref_dir]
    found = []
    for child in sorted(p for p in ref_dir.iterdir() if p.is_dir()):
        if _is_run_dir(child):
            found.append(child)
        else:
            found += [g for g in sorted(p for p in child.iterdir() if p.is_dir()) if _is_run_dir(g)]
    return found


def locate_stages(ref_dir: Path, stage1: Path | None, stage2: Path | None) -> tuple[tuple[Path, dict, Path], ...]:
    """((stage-1 dir, args, args file), (stage-2 dir, args, args file))."""
    if stage1 is None or stage2 is None:
        if not ref_dir.is_dir():
            raise ReferenceImportError("folder not found", path=ref_dir)
        runs = find_run_dirs(ref_dir)
        if not runs:
            raise ReferenceImportError(
                "not a reference run folder: no run folder with saved arguments (args.pkl / args.yaml) here or in "
                "its sub-folders",
                path=ref_dir,
                fix="pass the folder that holds the stage-1 and stage-2 run folders the reference training wrote",
            )
        by_stage: dict[bool, list[tuple[Path, dict, Path]]] = {False: [], True: []}
        for run in runs:
            args, src = read_run_args(run)
            by_stage[bool(args.get("retrain_all"))].append((run, args, src))
        picked = []
        for flag, given, label in ((False, stage1, "stage-1"), (True, stage2, "stage-2")):
            if given is not None:
                picked.append(given)
                continue
            cands = by_stage[flag]
            if not cands:
                raise ReferenceImportError(
                    f"missing stage: no {label} run folder (saved 'retrain_all: {flag}') below this folder; found "
                    + (", ".join(str(r) for r in runs) or "none"),
                    path=ref_dir,
                    fix=f"add the {label} run folder, or name it with --{label}",
                )
            if len(cands) > 1:
                raise ReferenceImportError(
                    f"{len(cands)} {label} run folders: {', '.join(str(c[0]) for c in cands)}",
                    path=ref_dir,
                    fix=f"choose one with --{label} DIR",
                )
            picked.append(cands[0][0])
        stage1, stage2 = picked
    out = []
    for run, want, label in ((Path(stage1), False, "stage-1"), (Path(stage2), True, "stage-2")):
        args, src = read_run_args(run)
        if bool(args.get("retrain_all")) != want:
            raise ReferenceImportError(
                f"this is a {'stage-2' if not want else 'stage-1'} run folder (saved retrain_all="
                f"{args.get('retrain_all')!r}), but it was given as the {label} folder",
                path=src,
                fix="pass the stage-1 run folder (retrain_all false) and the stage-2 one (retrain_all true)",
            )
        out.append((run, args, src))
    return tuple(out)


def stage1_file(ref: Reference, s1: Path) -> Path:
    """The stage-1 ``*_score.pt`` the reference's evaluation loads (the first match of the glob, as it does; more
    than one is refused here)."""
    scores = sorted(s1.glob("*_score.pt"))
    if not scores:
        raise ReferenceImportError(
            f"missing stage 1 checkpoint: no {ref.model_class}_score.pt (the best validation epoch) in this folder",
            path=s1,
            fix="the stage-1 run folder holds <Model>_score.pt next to args.pkl",
        )
    if len(scores) > 1:
        raise ReferenceImportError(f"several *_score.pt files: {', '.join(p.name for p in scores)}", path=s1)
    if scores[0].name != f"{ref.model_class}_score.pt":
        other = next((r for r in _all_refs() if scores[0].name == f"{r.model_class}_score.pt"), None)
        hint = f" (a checkpoint of {other.title}: import it with --from {other.method})" if other else ""
        raise ReferenceImportError(
            f"expected the {ref.title} checkpoint {ref.model_class}_score.pt, found {scores[0].name}{hint}",
            path=scores[0],
        )
    return scores[0]


def _all_refs():
    from avlowshot.importers.references import REFERENCES

    return REFERENCES.values()


def stage2_files(ref: Reference, s2: Path, epoch: int) -> list[Path]:
    files = []
    for folder in ref.repeats:
        f = s2 / folder / f"{ref.model_class}_score_ckpt_{epoch - 1}.pt"
        if not f.is_file():
            have = sorted(p.name for p in (s2 / folder).glob("*.pt")) if (s2 / folder).is_dir() else []
            raise ReferenceImportError(
                f"missing stage 2 checkpoint: the stage-1 model is from epoch {epoch} (stored 'epoch'), so the "
                f"reference evaluates {f.name} (the stage-2 model after as many epochs); "
                + (f"{folder}/ holds {', '.join(have)}" if have else f"there is no {folder}/ with checkpoints"),
                path=f,
                fix="import the stage-2 run trained for the stage-1 best epoch count (main.py --run all does that)",
            )
        files.append(f)
    return files


# ----------------------------------------------------------------------------------------------------------------
# Arguments -> config


def _set(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def check_known(ref: Reference, args: dict[str, Any], src: Path) -> None:
    """Every saved argument must be one of the reference's; else name the code base the arguments do fit."""
    unknown = sorted(k for k in args if k not in ref.rules)
    if not unknown:
        return
    fits = sorted((len(r.rules), r.method) for r in _all_refs() if r.method != ref.method and set(args) <= set(r.rules))
    if fits:
        other = reference(fits[0][1])
        raise ReferenceImportError(
            f"these are the saved arguments of a run of {other.title}, not of {ref.title} (e.g. "
            f"{', '.join(map(repr, unknown[:3]))} are not {ref.title} arguments)",
            path=src,
            fix=f"import it with --from {other.method}",
        )
    raise ReferenceImportError(
        f"argument(s) {', '.join(map(repr, unknown))} are not arguments of the {ref.title} code ({ref.repository}); "
        "this file comes from another code base or version",
        path=src,
        fix=f"import a run folder written by {ref.repository} (or choose the right --from)",
    )


def map_arguments(
    ref: Reference, args: dict[str, Any], src: Path, checks: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the avlowshot keys set from ``args``, the account of every argument: rule, value, target or reason).
    ``checks``: context name -> (expected value, message); a mismatch is an error naming ``src``."""
    values: dict[str, Any] = {}
    account: dict[str, dict[str, Any]] = {}
    check_known(ref, args, src)
    try:
        derived = ref.derive(args)
    except ValueError as exc:
        raise ReferenceImportError(str(exc), path=src) from None
    for key in sorted(args):
        v, rule = args[key], ref.rules[key]
        entry: dict[str, Any] = {"value": v, "rule": rule.kind}
        if rule.kind in ("to", "need") and rule.allowed:
            if not any(v == a and type(v) is type(a) for a in rule.allowed):
                raise ReferenceImportError(
                    f"argument '{key}' is {v!r}: {rule.why}; avlowshot imports only "
                    + " / ".join(repr(a) for a in rule.allowed),
                    path=src,
                )
        if rule.kind == "to":
            values[rule.target] = rule.convert(v) if rule.convert and v is not None else v
            entry["to"] = rule.target
        elif rule.kind == "derived":
            values[rule.target] = derived[rule.target]
            entry["to"] = rule.target
        elif rule.kind == "need":
            entry["why"] = rule.why
        elif rule.kind == "context":
            check = checks.get(rule.target)
            if check is not None:
                ok, msg = check(v)
                if not ok:
                    raise ReferenceImportError(f"argument '{key}' is {v!r}: {msg}", path=src)
            entry["checked"] = rule.target
        else:
            entry["why"] = rule.why
        account[key] = entry
    for target, v in derived.items():  # derived keys whose source arguments are absent get the reference default
        values.setdefault(target, v)
    return values, account


def _feature_dir(v: Any) -> str:
    return Path(str(v)).name


# ----------------------------------------------------------------------------------------------------------------


def _summary(name: str, epochs: int, best: int | None, rel: str | None, source: Path | None, **extra) -> dict:
    from avlowshot.train.trainer import StageOutcome

    extra = {"imported_from": None if source is None else str(source), **extra}
    return StageOutcome(
        name=name,
        epochs=epochs,
        best_epoch=best,
        best_hm=None,
        beta_best=None,
        beta_last=None,
        lr_drops=[],
        history=[],
        seconds=0.0,
        checkpoint_last=rel or "",
        checkpoint_best=rel,
        extra=extra,
    ).to_json()


def _check_state(ref: Reference, method, state: dict[str, torch.Tensor], path: Path, stage: int) -> None:
    """The mapped state dict must have exactly the model's keys and shapes; every failure names the file."""
    own = method.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        other = guess_reference(state)
        if other is not None and other != ref.method:
            raise ReferenceImportError(
                f"this is not a checkpoint of {ref.title}: its state dict has the keys of {reference(other).title} "
                f"(e.g. {', '.join(sorted(state)[:3])})",
                path=path,
                fix=f"import it with --from {other}",
            )

        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = [
            f"missing keys: {few(missing)}" if missing else "",
            f"unexpected keys: {few(unexpected)}" * bool(unexpected),
        ]
        raise ReferenceImportError(
            f"the state dict does not match the {ref.title} model its saved arguments describe; "
            + "; ".join(p for p in parts if p),
            path=path,
        )
    wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        msg = f"'{k}' has shape {tuple(state[k].shape)}, the model built from the saved arguments expects " + str(
            tuple(own[k].shape)
        )
        if k.startswith("classifier."):
            msg += (
                f": the classifier has {state[k].shape[0]} classes, the stage-{stage} label space of this dataset has "
                f"{own[k].shape[0]} (a checkpoint of another dataset or split?)"
            )
        if len(wrong) > 1:
            msg += f" (and {len(wrong) - 1} more: {', '.join(wrong[1:4])})"
        raise ReferenceImportError(msg, path=path)
    for k in own:
        if state[k].dtype != own[k].dtype:
            raise ReferenceImportError(f"'{k}' is {state[k].dtype}, expected {own[k].dtype}", path=path)


def import_run(
    source: str,
    ref_dir: str | Path,
    *,
    layout: str,
    dataset: str,
    root_dir: str | Path,
    out: str | Path,
    stage1: str | Path | None = None,
    stage2: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """Import a reference run folder into a new avlowshot run directory ``out`` and return it (see the module
    docstring). Raises :class:`~avlowshot.errors.AvlowshotError` subclasses naming the file and what was expected;
    nothing is written then."""
    from avlowshot.data.layouts import check_dataset, get_layout
    from avlowshot.train.protocol import CONFIG_FILE, RUN_FILE, RunContext

    ref = reference(source)
    check_dataset(dataset, known_only=True)  # the references train on the three benchmarks only
    out = Path(out)
    spec = get_layout(layout)
    if layout not in ref.layouts:
        raise ConfigError(f"--layout {layout}: {ref.title} runs are trained on {' or '.join(ref.layouts)} features")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AvlowshotError(f"{out}: already exists; choose a new --out folder (an import never overwrites)")
    ref_dir = Path(ref_dir)
    (s1, args1, src1), (s2, args2, src2) = locate_stages(
        ref_dir, None if stage1 is None else Path(stage1), None if stage2 is None else Path(stage2)
    )
    check_known(ref, args1, src1)
    check_known(ref, args2, src2)
    shots = None
    if spec.task == "gfsl":
        m = re.fullmatch(r"(\d+)-shot", str(args2.get("zero_shot_split", "")))
        if m is None:
            raise ReferenceImportError(
                f"argument 'zero_shot_split' is {args2.get('zero_shot_split')!r}; the {layout} layout needs '<k>-shot'",
                path=src2,
            )
        shots = int(m.group(1))

    # checkpoints (read first: a crafted or foreign file stops the import before the data is touched)
    f1 = stage1_file(ref, s1)
    c1 = load_reference_checkpoint(f1)
    epoch = int(c1["epoch"])
    f2 = stage2_files(ref, s2, epoch)
    c2 = [load_reference_checkpoint(f) for f in f2]

    # config: the shipped one for this benchmark, overwritten by every mapped argument
    base = load_config(None, method=ref.method, dataset=dataset, feature_set=spec.feature_set, shots=shots)
    raw = base.model_dump(mode="json")
    split_name = spec.split_family_name(shots)
    feat_dir = spec.feature_dir.format(k=f"{shots}-shot")

    info = {
        "method": ref.method,
        "layout": layout,
        "dataset": dataset,
        "root_dir": str(Path(root_dir).resolve()),
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
        "shots": shots,
        "seed": int(args1.get("seed", raw["seed"])),
        "compat": COMPAT,
        "version": __version__,
    }

    def checks_for(stage: int, ctx=None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "dataset": lambda v: (v == dataset, f"the run was trained on {v}, the import is for --dataset {dataset}"),
            "split": lambda v: (v == split_name, f"expected '{split_name}' (the class split of --layout {layout})"),
            "feature_dir": lambda v: (
                _feature_dir(v) == feat_dir,
                f"expected '{feat_dir}' (the features of --layout {layout})",
            ),
            "stage": lambda v: (bool(v) == (stage == 2), f"expected {stage == 2} in the stage-{stage} run folder"),
            "selavi": lambda v: (
                bool(v) == (spec.feature_set == "main"),
                f"the collator rates of --layout {layout} are {spec.audio.step_seconds} s / {spec.video.step_seconds}"
                " s per row",
            ),
            "text_file": lambda v: (
                v in (None, "None") or v == spec.text_files(Path("."), dataset, shots)[0].name,
                f"the {layout} layout reads {spec.text_files(Path('.'), dataset, shots)[0].name}",
            ),
        }
        if ctx is not None:
            da, dv = ctx.store.audio.dim, ctx.store.video.dim
            c["input_size"] = lambda v: (
                v is None or (v == da and v == dv),
                f"the features of this dataset root are {da}-d audio / {dv}-d video",
            )
            c["input_size_audio"] = lambda v: (v == da, f"the audio features of this dataset root are {da}-d")
            c["input_size_video"] = lambda v: (v == dv, f"the video features of this dataset root are {dv}-d")
            n = len(ctx.label_space(stage))
            c["logits_length"] = lambda v: (
                v == n,
                f"the stage-{stage} label space of this dataset has {n} classes (a run of another dataset or split?)",
            )
        return c

    values1, account1 = map_arguments(ref, args1, src1, checks_for(1))
    values2, account2 = map_arguments(ref, args2, src2, checks_for(2))
    model1 = {k: v for k, v in values1.items() if k.startswith("model.")}
    model2 = {k: v for k, v in values2.items() if k.startswith("model.")}
    differ = sorted(k for k in set(model1) | set(model2) if model1.get(k) != model2.get(k))
    if differ:
        raise ReferenceImportError(
            f"the stage-1 run ({src1}) and this stage-2 run were trained with different model settings: "
            + ", ".join(f"{k[6:]} {model1.get(k)!r} vs {model2.get(k)!r}" for k in differ),
            path=src2,
            fix="import the stage-2 run that main.py --run all trained after this stage-1 run",
        )
    # model: stage 2's arguments (the reference builds from them); schedule: stage 1's (stage 2 ran best + 1 epochs)
    for k, v in {**{k: v for k, v in values2.items() if k.startswith("model.")}, **values1}.items():
        _set(raw, k, v)
    try:
        cfg = validate_config(raw, source=str(src2), method=ref.method)
    except ConfigError as exc:
        raise ReferenceImportError(f"the saved arguments give an invalid avlowshot config:\n{exc}", path=src2) from None

    ctx = RunContext(info, cfg, device, cache_dir=cache_dir)
    for stage, args, src in ((1, args1, src1), (2, args2, src2)):
        map_arguments(ref, args, src, checks_for(stage, ctx))

    notes = []
    fine_tune = args1.get("epochs_fine_tune")
    if ref.method == "avdiff" and isinstance(fine_tune, int) and epoch != fine_tune:
        # the reference tests with the beta of the LAST stage-1 validation, whose model is not in the folder
        notes.append(
            f"stage 1 selected epoch {epoch} of {fine_tune}: the reference tested with the beta of the last stage-1 "
            "validation (its model is not saved); the beta here comes from the saved best-epoch model"
        )
        log.warning("%s: %s", f1, notes[-1])

    # weights: mapped keys, built and strictly loaded into the model the config describes
    stage_states = []
    for stage, c, path in [(1, c1, f1)] + [(2, c, p) for c, p in zip(c2, f2, strict=True)]:
        try:
            state = map_state_dict(ref, c["model"])
        except KeyMapError as exc:
            raise ReferenceImportError(str(exc), path=path) from None
        method = ctx.build(stage)
        _check_state(ref, method, state, path, stage)
        method.load_state_dict(state, strict=True)
        if stage == 2 and int(c["epoch"]) != epoch:
            raise ReferenceImportError(f"stored epoch {c['epoch']}, expected {epoch} (the stage-1 model's)", path=path)
        stage_states.append((stage, path, method.state_dict()))
        del method

    # write everything into a temporary folder, then rename it into place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".import", dir=out.parent))
    try:
        rel = f"checkpoints/epoch-{epoch - 1:03d}"
        meta = {"method": ref.method, "version": __version__, "epoch": epoch - 1, "epochs_done": epoch}
        subs = ctx.curriculum
        s1_dir = tmp / "stage-1" / subs[-1].name if subs else tmp / "stage-1"
        stage2_dirs = [tmp / "stage-2" / f"repeat-{r}" for r in range(len(f2))] if subs else [tmp / "stage-2"]
        for (_stage, path, state), d in zip(stage_states, [s1_dir, *stage2_dirs], strict=True):
            name = str(d.relative_to(tmp))
            ckpt.save_checkpoint(d / rel, state, {**meta, "stage": name, "imported_from": str(path.resolve())})
            ckpt.atomic_write_json(
                d / "summary.json",
                _summary(name, epoch, epoch - 1, rel, path.resolve()),
            )
        if subs:  # the earlier substages have no checkpoint of their own in the reference's folders
            for sub in subs[:-1]:
                ckpt.atomic_write_json(
                    tmp / "stage-1" / sub.name / "summary.json",
                    _summary(f"stage-1/{sub.name}", int(args1.get("epochs", 0)), None, None, None),
                )
        files = [src1, f1, src2, *f2]
        imported = {
            "from": ref.method,
            "reference": ref.repository,
            "ref_dir": str(ref_dir.resolve()),
            "stage_1": str(s1.resolve()),
            "stage_2": str(s2.resolve()),
            "stage_1_epoch": epoch,
            "files": {str(f.resolve()): ckpt.file_sha256(f) for f in files},
            "arguments": {"stage_1": account1, "stage_2": account2},
            "notes": notes,
        }
        ckpt.atomic_write_text(tmp / CONFIG_FILE, dump_config(cfg))
        from avlowshot.train.protocol import _now

        ckpt.atomic_write_json(tmp / RUN_FILE, {**info, "created": _now(), "imported": _jsonable(imported)})
        if out.exists():
            out.rmdir()  # an empty folder (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s (%s, epoch %d) into %s", ref.title, ref_dir, epoch, out)
    return out


def _jsonable(obj: Any) -> Any:
    """Saved arguments as JSON values (paths are already strings; anything else becomes its repr)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return repr(obj)
