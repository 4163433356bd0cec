"""The ``extract``, ``embed-classes`` and ``predict`` commands (registered on the main app by ``avlowshot.cli``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from avlowshot.cli_common import console, err_console, fail, styled
from avlowshot.errors import AvlowshotError, DataError, WeightsError

ENCODER_HELP = "w2v | clip | clap | clip+clap | minilm"
TEXT_WEIGHTS_HELP = (
    "w2v: a fastText .bin or word2vec .bin/.txt/.vec file; clip / clap: a Hugging Face model folder; "
    "clip+clap: a folder holding clip/ and clap/; minilm: none (bundled)."
)


class VideosPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- videos/s" if speed is None else f"{speed:.2f} videos/s")


def text_files(encoder, names: list[str], family: str) -> list[tuple[str, object, dict]]:
    """The layout's text files for ``names``: ``[(file name pattern, vectors, encoder spec)]``. ClipClap's layout
    keeps CLIP and CLAP in two files, so it needs the clip+clap encoder; the others take one file."""
    if family == "clipclap":
        if encoder.name != "clip+clap":
            raise DataError(
                f"the clipclap layout stores CLIP and CLAP text embeddings; --text-encoder {encoder.name} gives one",
                key="text-encoder",
                fix="use --text-encoder clip+clap",
            )
        patterns = ("word_embeddings_{tag}_normed.npy", "wavcaps_word_embeddings_{tag}_normed.npy")
        return [(p, part.encode(names), part.spec()) for p, part in zip(patterns, encoder.parts, strict=True)]
    return [("word_embeddings_{tag}_normed.npy", encoder.encode(names), encoder.spec())]


def register(app: typer.Typer) -> None:
    @app.command(epilog="Example: avlowshot extract --features cls --videos videos/ --out data/Mine --weights weights/")
    def extract(
        features: str = typer.Option(..., help="cls (C3D + VGGish) | clipclap (CLIP image + CLAP audio)."),
        videos: Path = typer.Option(..., help="A folder <class>/<video file>, or a csv list with columns path,class."),
        out: Path = typer.Option(..., help="Dataset root to write (features/, class-split/, extracted/)."),
        weights: Path = typer.Option(..., help="Folder with the backbone weights (see the README for the files)."),
        shard: str = typer.Option(None, help="i/N: extract every N-th video starting at i (run N of these)."),
        workers: int = typer.Option(0, help="Decoding processes beside the one running the backbones (0: inline)."),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N for the backbones."),
        dataset: str = typer.Option(None, help="Dataset name in the file names (default: the --out folder name)."),
        compat: str = typer.Option(
            "none", help="none (RGB frames) | official (reproduce the references' quirks: BGR / negative frames)."
        ),
        text_encoder: str = typer.Option(None, help=f"{ENCODER_HELP} (default: minilm; clip+clap for clipclap)."),
        text_weights: Path = typer.Option(None, help=TEXT_WEIGHTS_HELP),
        split_seed: int = typer.Option(0, help="Seed of the class split and of the videos' split folders."),
    ) -> None:
        """Decode videos, compute backbone features, and write the layouts the readers read (resumable)."""
        from avlowshot.data.layouts import check_dataset
        from avlowshot.extract import pipeline
        from avlowshot.extract.assemble import LAYOUTS_OF, assemble

        try:
            if features not in pipeline.FEATURE_SETS:
                raise DataError(
                    f"unknown feature set '{features}'", key="features", fix=f"use one of {pipeline.FEATURE_SETS}"
                )
            from avlowshot.train.config import COMPAT_MODES

            if compat not in (*COMPAT_MODES, "fixed"):  # "fixed": this option's former name of none
                raise DataError(f"unknown --compat '{compat}'", key="compat", fix=f"use {' or '.join(COMPAT_MODES)}")
            compat = "fixed" if compat in ("none", "fixed") else compat  # extractor.json keeps its recorded name
            dataset = check_dataset(dataset or out.resolve().name)
            items = pipeline.list_videos(videos)
            i, n = pipeline.parse_shard(shard)
            extractor = pipeline.build_extractor(features, weights, device, compat)
            # the class-name encoder is loaded first too, so a wrong text set-up fails before hours of extraction
            default_text = "clip+clap" if features == "clipclap" else "minilm"
            backbones = weights if features == "clipclap" else None  # CLIP/CLAP text from the same folders
            encoder = _encoder(text_encoder or default_text, text_weights, backbones)
            identity = {
                "features": features,
                "compat": compat,
                "weights": pipeline.weights_digest(features, weights),
            }
            work = pipeline.work_dir(out, features)
            pipeline.claim_work_dir(work, identity)
            with Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), VideosPerSecond(),
                TimeElapsedColumn(), console=err_console,
            ) as bar:  # fmt: skip
                task = bar.add_task(f"extract {features} {i}/{n}", total=None)
                report = pipeline.extract_videos(
                    items,
                    extractor,
                    work,
                    shard=(i, n),
                    workers=workers,
                    on_video=lambda done, total: bar.update(task, completed=done, total=total),
                )
            console.print(
                f"shard {i}/{n}: {report.total} videos, {report.done} extracted ({report.videos_per_second:.2f} "
                f"videos/s), {report.skipped} already done, {len(report.failed)} failed"
            )
            for vid, err in report.failed[:5]:
                err_console.print(styled("failed", "yellow"), f"{vid}: {err.splitlines()[0]}", highlight=False)
            if report.failed:
                err_console.print(f"every failure: {report.failed_log}", highlight=False)
            if n > 1:
                console.print("when every shard is done, run the same command without --shard to write the layouts")
                return
            have, missing = pipeline.finished(items, work)
            if not have:
                raise DataError("no video could be extracted", path=report.failed_log, fix="see the errors there")
            family = "clipclap" if features == "clipclap" else "cls"
            written = assemble(
                out,
                features,
                dataset,
                have,
                work,
                lambda names: text_files(encoder, names, family),
                seed=split_seed,
                extractor_meta=identity,
            )
        except AvlowshotError as exc:
            raise fail(exc) from None
        skipped = f" ({len(missing)} failed videos left out)" if missing else ""
        console.print(f"wrote {', '.join(written)} under {out} from {len(have)} videos{skipped}")
        layout = LAYOUTS_OF[features][0]
        console.print(f"next: avlowshot check-data --layout {layout} --root-dir {out} --dataset {dataset}")

    @app.command(
        "embed-classes",
        epilog="Example: avlowshot embed-classes --encoder minilm --classes classes.txt --out text/word_embeddings.npy",
    )
    def embed_classes(
        encoder: str = typer.Option("minilm", help=ENCODER_HELP),
        classes: Path = typer.Option(..., help="One class name per line, or a csv with a 'manual' column."),
        out: Path = typer.Option(..., help="The .npy to write ({name: vector}, the layouts' text format)."),
        weights: Path = typer.Option(None, help=TEXT_WEIGHTS_HELP),
    ) -> None:
        """Embed class names into the text-embedding file the layouts read (plus <out>.encoder.json)."""
        from avlowshot.extract.text import save_embeddings

        try:
            names = _read_names(classes)
            enc = _encoder(encoder, weights, None, "--weights")
            if enc.name == "clip+clap":  # clip+clap: CLIP to --out, CLAP to wavcaps_<name> (ClipClap's layout)
                targets = [(out, enc.parts[0]), (out.with_name(f"wavcaps_{out.name}"), enc.parts[1])]
            else:
                targets = [(out, enc)]
            for path, part in targets:
                save_embeddings(path, names, part.encode(names), part.spec())
        except AvlowshotError as exc:
            raise fail(exc) from None
        for path, part in targets:
            console.print(f"wrote {path}: {len(names)} classes x {part.dim} ({part.name})")

    @app.command(
        epilog='Example: avlowshot predict --run-dir runs/RUN --features clip.npz --classes "knitting, horse riding"'
    )
    def predict(
        run_dir: Path = typer.Option(..., help="A finished run folder (<log-dir>/<method>_<dataset>_..._seed<N>)."),
        video: Path = typer.Option(None, help="A video file (needs --weights)."),
        features: Path = typer.Option(None, help="An extracted feature file (extracted/<set>/videos/<id>.npz)."),
        classes: str = typer.Option(..., help='Comma-separated class names, e.g. "playing guitar, horse riding".'),
        top: int = typer.Option(5, help="How many names to print."),
        weights: Path = typer.Option(None, help="Backbone weights folder (with --video)."),
        text_encoder: str = typer.Option(None, help=f"{ENCODER_HELP}: embeds names the run does not know."),
        text_weights: Path = typer.Option(None, help=TEXT_WEIGHTS_HELP),
        device: str = typer.Option("cpu", help="cpu | cuda."),
        cache_dir: Path = typer.Option(None, help="Feature cache folder (default: the user cache)."),
        root_dir: Path = typer.Option(None, help="The run's dataset root, if it moved since the run."),
    ) -> None:
        """Rank class names for one video with a trained run (new names are embedded on the fly)."""
        from avlowshot.predict import Predictor, parse_names

        try:
            if (video is None) == (features is None):
                raise DataError("give exactly one of --video and --features", key="video/features")
            names = parse_names(classes)
            predictor = Predictor(run_dir, device, cache_dir, root_dir=root_dir)
            predictor.check_names(names)
            if video is not None:
                if weights is None:
                    raise DataError("--video needs --weights (the backbone weights folder)", key="weights")
                audio, vid = predictor.features_from_video(video, weights)
            else:
                audio, vid = predictor.features_from_file(features)
            encoder = None
            recorded = _recorded_encoder(predictor)
            name = text_encoder or recorded
            if name is not None:
                encoder = _encoder(name, text_weights, weights)
            ranked = predictor.rank(audio, vid, names, encoder)
        except AvlowshotError as exc:
            raise fail(exc) from None
        kind = "distance" if predictor.method.score_kind == "distance" else "probability"
        table = Table(title=f"{predictor.ctx.cfg.method}: {video or features}")
        for col in ("rank", "class", kind, "class in the run"):
            table.add_column(col, justify="right" if col in ("rank", kind) else "left")
        for r, item in enumerate(ranked[: max(1, top)], 1):
            table.add_row(str(r), item.name, f"{item.score:.4f}", item.role)
        console.print(table)


def _read_names(path: Path) -> list[str]:
    import csv

    from avlowshot.data.classes import read_class_list

    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read ({exc})", path=path) from None
        if not rows or "manual" not in rows[0]:
            raise DataError("expected a 'manual' column", path=path, key="manual")
        return [r["manual"].strip() for r in rows if r["manual"].strip()]
    return read_class_list(path, sort=False)


def _recorded_encoder(predictor) -> str | None:
    """The encoder recorded next to the run's text file(s) by embed-classes / extract, if any."""
    from avlowshot.extract.text import read_encoder_spec

    bench = predictor.ctx.bench
    specs = [read_encoder_spec(f) for f in bench.spec.text_files(bench.root, bench.dataset, bench.shots)]
    if any(s is None for s in specs):
        return None
    names = [s.get("encoder") for s in specs]
    return "clip+clap" if names == ["clip", "clap"] else names[0]


def _encoder(name: str, text_weights: Path | None, weights: Path | None, option: str = "--text-weights"):
    """Build a text encoder; CLIP/CLAP text default to the backbone folders of ``extract --weights``."""
    from avlowshot.extract.text import TEXT_ENCODERS, build_text_encoder

    if name not in TEXT_ENCODERS:
        raise DataError(f"unknown text encoder '{name}'", key="encoder", fix=f"use one of {', '.join(TEXT_ENCODERS)}")
    if text_weights is None and weights is not None and name in ("clip", "clap", "clip+clap"):
        text_weights = weights if name == "clip+clap" else weights / name
    if text_weights is None and name != "minilm":
        raise WeightsError(f"the {name} text encoder needs its weights", fix=f"pass {option}: {TEXT_WEIGHTS_HELP}")
    return build_text_encoder(name, text_weights)
