"""The ``featkit`` command: each command resolves paths, calls one library function, prints a one-line
summary, and turns library errors into a clean message and exit code.

Option defaults are read from :mod:`featkit.options` (written once, in the
library), and option names mirror the Python names in kebab-case.
"""

from __future__ import annotations

import functools
import inspect
import json as jsonlib
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from featkit.errors import FeatkitError, PhotoSourceWarning, UntrustedHeadWarning
from featkit.escape import json_printable, printable, without_credentials
from featkit.options import BACKBONE, DEMO, DOWNLOAD, ENDPOINT_ENV, EXTRACT, FIT, MLP, PREDICT, SPLIT


class OneLineErrors(TyperGroup):
    """typer's group, with the usage errors its parser raises (``--workers abc``, an unknown option) as one
    ``error:`` line naming the option, exit 2, like featkit's own errors, instead of a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        click_errors = sys.modules[typer.BadParameter.__module__]  # the click typer runs on (its own copy in typer >= 0.20)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # plain `featkit`: the help (already printed by rich help)
                if e.format_message().strip():
                    typer.echo(e.format_message(), err=True)
            else:
                where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
                typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Learn where a photo was taken: extract frozen VGG16 features once, fit heads, compare them per city.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CacheOpt = typer.Option("cache", "--cache", envvar="FEATKIT_CACHE", help="Folder of the feature cache, fitted heads and downloads.")
ReportsOpt = typer.Option("reports", "--reports", envvar="FEATKIT_REPORTS", help="Folder the comparison report is written to.")
DeviceOpt = typer.Option(EXTRACT.device, "--device", help="auto (CUDA when present), cpu, or cuda[:N].")
SplitSeedOpt = typer.Option(
    SPLIT.split_seed, "--split-seed",
    help="Seed of the train / val / test splits; recorded in the cache, and shared by all its backbones (change it with featkit split).",
)
TestSizeOpt = typer.Option(SPLIT.test_size, "--test-size", help="Test photos per city: a count (e.g. 500, the study's) or a fraction (< 1).")
ValSizeOpt = typer.Option(SPLIT.val_size, "--val-size", help="Validation photos per city: a count or a fraction.")
ProgressOpt = typer.Option(EXTRACT.progress, "--progress/--no-progress", help="Progress bars on stderr.")


def flag(param: str) -> str:
    """The command-line spelling of a Python parameter: ``batch_size`` -> ``--batch-size``."""
    return "--" + param.replace("_", "-")


OPTION_OF = {"cache_dir": "cache", "reports_dir": "reports"}  # library parameters the commands spell otherwise


def option_for(command, param: str) -> str | None:
    """How ``command`` spells the library parameter ``param``: every long spelling of its option
    (``--max-iter/--epochs``), an argument's metavar (``SOURCE``), or None when it takes no such value."""
    p = inspect.signature(command).parameters.get(OPTION_OF.get(param, param))
    if p is None:
        return None
    if isinstance(p.default, typer.models.ArgumentInfo):
        return p.name.upper()
    longs = [d.split("/")[0] for d in getattr(p.default, "param_decls", None) or () if d.startswith("--")]
    return "/".join(longs) or None


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {printable(without_credentials(message))}", err=True)  # messages quote names and URLs: outside text
    raise typer.Exit(code)


def show_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Each distinct warning once, after the command: featkit's own as one plain ``warning:`` line, others
    as Python formats them (file, line, category). Written here, not by ``warnings.showwarning``, which
    whoever called the command (a test runner, a notebook) may have replaced with a recorder of its own."""
    seen: set[tuple] = set()
    for w in caught:
        key = (w.category, str(w.message), w.filename, w.lineno)
        if key in seen:
            continue
        seen.add(key)
        if issubclass(w.category, (UntrustedHeadWarning, PhotoSourceWarning)):
            typer.echo(f"warning: {printable(w.message)}", err=True)
        else:
            typer.echo(printable(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line).rstrip(), newlines=True), err=True)


def clean_errors(fn):
    """User mistakes and interruptions end with one line on stderr and a non-zero exit, never a traceback.

    A library error about a parameter names it the Python way (`batch_size`); here it is named as the option (--batch-size).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            caught: list[warnings.WarningMessage] = []
            try:
                with warnings.catch_warnings(record=True) as recorded:  # the filters in force still apply
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        caught = list(recorded)
            finally:  # shown only once recording has ended: shown inside it, each would be recorded again, for ever
                show_warnings(caught)
        except FeatkitError as e:
            msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, whatever the library said
            if e.param:
                option = option_for(fn, e.param)
                named = f"`{e.param}`" in msg
                msg = msg.replace(f"`{e.param}`", option or flag(e.param))
                if option and not named:  # the line always names the option at fault
                    msg = f"{option}: {msg}"
            fail(msg)
        except KeyboardInterrupt:
            fail("interrupted; work done so far is saved, rerun the same command to resume", 130)

    return wrapper


@app.command()
@clean_errors
def download(
    per_city: int = typer.Option(DOWNLOAD.per_city, "--per-city", help="Photos to keep per city (past Flickr's ~4,000-per-query cap via taken-date windows)."),
    cities: Optional[str] = typer.Option(None, "--cities", help="Comma list of default cities (e.g. London,Paris) or a .toml file of your own; default: the study's ten."),
    cache: Path = CacheOpt,
    query_template: str = typer.Option(DOWNLOAD.query_template, "--query-template", "--query", help="Search text template; {city} is replaced by each city's query."),
    license: str = typer.Option(DOWNLOAD.license, "--license", help="any, cc, cc-commercial, public-domain, or Flickr licence ids (e.g. 4,5,9)."),
    has_geo: bool = typer.Option(DOWNLOAD.has_geo, "--has-geo", help="Only geotagged photos."),
    min_size: int = typer.Option(DOWNLOAD.min_size, "--min-size", help="Reject images whose shorter side is below this many pixels."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", envvar=ENDPOINT_ENV, help="Flickr REST URL (a proxy, mirror or local fake)."),
    workers: int = typer.Option(DOWNLOAD.workers, "--workers", help="Concurrent image downloads."),
    min_interval_s: float = typer.Option(DOWNLOAD.min_interval_s, "--min-interval-s", "--min-interval", help="Seconds between Flickr API calls (Flickr allows 3,600 an hour)."),
    progress: bool = ProgressOpt,
) -> None:
    """Download city photos from Flickr into CACHE/images/<city>/ and CACHE/manifest.csv (resumable)."""
    from featkit.cities import load_cities
    from featkit.collect import download_photos
    from featkit.flickr import resolve_credentials, resolve_license
    from featkit.options import DownloadOptions
    from featkit.validate import check_url, ensure_writable_dir

    DownloadOptions(  # checks every value before the key is looked for or a folder made
        per_city=per_city, query_template=query_template, license=license, has_geo=has_geo, min_size=min_size, min_interval_s=min_interval_s, workers=workers,
    )
    resolve_license(license)
    check_url("endpoint", endpoint)
    city_list = load_cities(cities)
    ensure_writable_dir(cache, "cache_dir")
    key, secret = resolve_credentials()
    s = download_photos(
        city_list, cache, per_city, api_key=key, api_secret=secret, endpoint=endpoint, query_template=query_template,
        license=license, has_geo=has_geo, min_size=min_size, min_interval_s=min_interval_s, workers=workers,
        progress=progress, log=lambda m: typer.echo(m, err=True),
    )
    for line in s.lines():
        typer.echo(line)
    typer.echo(str(s))


@app.command()
@clean_errors
def extract(
    source: Path = typer.Argument(..., help="Folder with one sub-folder per city, or a manifest CSV (photo_id, city, path[, owner])."),
    cache: Path = CacheOpt,
    device: str = DeviceOpt,
    backbone: str = typer.Option(BACKBONE.backbone, "--backbone", help="vgg16 (the study's), a torchvision model name (resnet50, convnext_tiny, vit_b_16, ...) or timm:NAME (any timm model); each backbone's features go to their own file in CACHE, all sharing one split."),
    weights: Optional[str] = typer.Option(BACKBONE.weights, "--weights", help="State_dict file for the backbone (VGG16: vgg16().features or vgg16()); default: the library's own pretrained weights (torchvision's, timm's); 'random' for seeded random weights."),
    pooling: Optional[str] = typer.Option(BACKBONE.pooling, "--pooling", help="VGG16: flatten (512x7x7 = 25,088 values, the study's, default) or avg (512); other backbones: their own global pooling (avg, or the CLS token of a ViT)."),
    image_size: Optional[str] = typer.Option(
        BACKBONE.image_size, "--image-size",
        help="Input size: one number for a square (224) or WIDTHxHEIGHT to keep the photos' aspect ratio (320x224); default: the backbone's own (224 for VGG16; multiples of 32 there).",
    ),
    flip: bool = typer.Option(BACKBONE.flip, "--flip/--no-flip", help="Average each photo's features with those of its mirror image (test-time augmentation; twice the compute)."),
    dtype: str = typer.Option(EXTRACT.dtype, "--dtype", help="Stored feature dtype: float16 or float32."),
    batch_size: int = typer.Option(EXTRACT.batch_size, "--batch-size"),
    decode: str = typer.Option(EXTRACT.decode, "--decode", help="Where JPEGs are decoded: cpu (worker processes), gpu (nvJPEG on the CUDA device; CPU for what it cannot take), or auto (cpu for now)."),
    workers: Optional[int] = typer.Option(EXTRACT.workers, "--workers", help="Image-decoding worker processes (default: cores - 1)."),
    split_seed: int = SplitSeedOpt,
    weights_seed: int = typer.Option(
        EXTRACT.weights_seed, "--weights-seed",
        help="Seed of --weights random (their initialisation; recorded, so predict rebuilds them); other weights ignore it. Not the split's.",
    ),
    test_size: float = TestSizeOpt,
    val_size: float = ValSizeOpt,
    overwrite: bool = typer.Option(EXTRACT.overwrite, "--overwrite", help="Start the cache again instead of appending."),
    retry_failed: bool = typer.Option(EXTRACT.retry_failed, "--retry-failed", help="Read again the photos recorded as failed (see CACHE/failed.csv), e.g. after fixing their files."),
    repair: bool = typer.Option(EXTRACT.repair, "--repair", help="First drop the cached rows that fail their checks (see featkit verify), then extract them again."),
    progress: bool = ProgressOpt,
) -> None:
    """Run the photos once through a frozen backbone (VGG16's conv base by default) into CACHE/features.h5,
    or CACHE/features-<backbone>.h5 for other backbones (resumable)."""
    from featkit.api import extract as extract_photos

    s = extract_photos(
        source, cache, backbone=backbone, weights=weights, pooling=pooling, image_size=image_size, flip=flip, device=device, batch_size=batch_size,
        workers=workers, decode=decode, dtype=dtype, split_seed=split_seed, weights_seed=weights_seed, test_size=test_size, val_size=val_size, overwrite=overwrite, repair=repair, retry_failed=retry_failed, progress=progress,
    )
    if s.reporter:  # under torchrun only rank 0 prints
        typer.echo(s.line())
        sizes = ", ".join(f"{k} {sum(v.values())}" for k, v in s.split_counts.items())
        typer.echo(f"splits: {sizes} -> {s.cache_path}")
    if s.interrupted:
        fail("interrupted; the batches done are saved, rerun the same command to resume", 130)


@app.command()
@clean_errors
def split(
    cache: Path = CacheOpt,
    split_seed: int = typer.Option(
        SPLIT.split_seed, "--split-seed", "--seed",
        help="Seed of the new splits, for every backbone of the cache (recorded: extract then takes the same --split-seed; --seed is its old name).",
    ),
    test_size: float = TestSizeOpt,
    val_size: float = ValSizeOpt,
) -> None:
    """Re-draw the train / val / test splits of the cached photos without re-extracting them (refit heads after)."""
    from featkit.api import split as split_cache

    counts = split_cache(cache, split_seed=split_seed, test_size=test_size, val_size=val_size)
    sizes = ", ".join(f"{k} {sum(v.values())}" for k, v in counts.items())
    typer.echo(f"splits: {sizes} (split seed {split_seed}, test size {test_size:g}, val size {val_size:g}); refit heads with `featkit fit`")


@app.command()
@clean_errors
def verify(
    cache: Path = CacheOpt,
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Check this backbone's features only, spelt as extract --backbone takes it (timm:NAME); default: every backbone the cache holds."),
    repair: bool = typer.Option(False, "--repair", help="Drop the rows that fail (featkit extract then extracts them again); bring an older cache layout up to date."),
) -> None:
    """Read every cached feature and check it: each batch's checksum, finite values, splits, unique photos (exit 1 when damaged)."""
    from featkit.api import verify as verify_cache

    from featkit.errors import CacheDamaged

    damaged = 0
    try:
        checked = verify_cache(cache, backbone=backbone, repair=repair)
    except CacheDamaged as e:  # damage only a rebuild mends: as much a finding of verify's as the rest (exit 1)
        fail(str(e), 1)
    for d, dropped in checked:
        if dropped:
            typer.echo(f"{d.path}: dropped {dropped} damaged rows; extract them again with featkit extract PHOTOS --cache {cache}")
        elif d.ok:
            typer.echo(d.line())
        else:
            typer.echo(f"error: {d.line()}", err=True)
            damaged += 1
    if damaged:
        raise typer.Exit(1)


@app.command()
@clean_errors
def fit(
    head: str = typer.Option(FIT.head, "--head", help="mlp, logreg, svm, a comma list, or all."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Fit on this backbone's features only, spelt as extract --backbone takes it (timm:NAME); default: every backbone the cache holds."),
    cache: Path = CacheOpt,
    device: str = typer.Option(FIT.device, "--device", help="auto (CUDA when present), cpu, or cuda[:N]."),
    seed: int = typer.Option(FIT.seed, "--seed", help="Seed of the heads' training (initial weights, shuffling); the same seed gives the same heads. The splits and random weights have their own (extract --split-seed, --weights-seed)."),
    max_iter: int = typer.Option(MLP.max_iter, "--max-iter", "--epochs", help="MLP: most epochs (early stopping usually ends sooner)."),
    n_iter_no_change: int = typer.Option(MLP.n_iter_no_change, "--n-iter-no-change", "--patience", help="MLP: epochs without improvement before stopping (the study's 7)."),
    hidden_layer_sizes: int = typer.Option(MLP.hidden_layer_sizes[0], "--hidden-layer-sizes", "--hidden", help="MLP: hidden units."),
    dropout: float = typer.Option(MLP.dropout, "--dropout", help="MLP: dropout rate."),
    alpha: float = typer.Option(MLP.alpha, "--alpha", help="MLP: L2 weight decay."),
    learning_rate_init: float = typer.Option(MLP.learning_rate_init, "--learning-rate-init", "--lr", help="MLP: Adam learning rate."),
    batch_size: int = typer.Option(MLP.batch_size, "--batch-size", help="MLP: mini-batch size."),
    stream: str = typer.Option(FIT.stream, "--stream", help="yes: train the heads that can from shuffled blocks of the cache (larger than memory); no: load it; auto: stream when it would take over half the free memory."),
    progress: bool = typer.Option(FIT.progress, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Train heads on the cached features (train split; val split for early stopping and choices)."""
    from featkit.api import fit as fit_heads
    from featkit.options import MLPOptions

    mlp = MLPOptions(
        max_iter=max_iter, n_iter_no_change=n_iter_no_change, hidden_layer_sizes=(hidden_layer_sizes,), dropout=dropout,
        alpha=alpha, learning_rate_init=learning_rate_init, batch_size=batch_size,
    )
    records = fit_heads(cache, head, backbone=backbone, seed=seed, device=device, mlp=mlp, stream=stream, progress=progress, log=typer.echo)
    from featkit.cache.names import heads_dir

    typer.echo(f"{len(records)} head(s) fitted -> {heads_dir(cache)}")


@app.command()
@clean_errors
def compare(
    cache: Path = CacheOpt,
    reports: Path = ReportsOpt,
    cities: Optional[str] = typer.Option(None, "--cities", help="Cities file (.toml with name, lat, lon) or default names, for the distance figures; default: cities.toml beside the city folders, else the study's ten."),
    leaks: bool = typer.Option(True, "--leaks/--no-leaks", help="Check the split for owners and near-duplicate photos shared by test and train (reads the photo files)."),
) -> None:
    """Evaluate every fitted head on the same test split; write compare.html, compare.md, compare.json and confusion PNGs."""
    from featkit.api import compare as compare_heads

    from featkit.naming import head_name

    results, paths = compare_heads(cache, reports, cities=cities, leaks=leaks)
    best = head_name(results.best)  # the report's best (accuracy, then name), whose galleries it shows
    summary = ", ".join(f"{head_name(h)} {m.accuracy:.3f}" for h, m in results.heads.items())
    typer.echo(f"test accuracy: {summary} (best: {best}) -> {paths['html']} (and compare.md, compare.json)")


@app.command()
@clean_errors
def predict(
    inputs: list[Path] = typer.Argument(..., help="Photos, or folders of photos (walked recursively for image files).", show_default=False),
    head: Optional[str] = typer.Option(PREDICT.head, "--head", help="Which fitted head (mlp, logreg, svm, ...; BACKBONE/HEAD, e.g. timm:NAME/logreg, when the cache holds several backbones); default: the one with the best validation accuracy."),
    top: int = typer.Option(PREDICT.top, "--top", help="Most probable cities shown per photo."),
    json: bool = typer.Option(False, "--json", help="One JSON object per photo on stdout instead of the table."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the predictions to this CSV file (source, rank, city, probability, error)."),
    weights: Optional[str] = typer.Option(PREDICT.weights, "--weights", help="The weights the cache was extracted with (a state_dict file, 'random' or 'torchvision'); default: the ones the cache records."),
    seed: Optional[int] = typer.Option(PREDICT.seed, "--seed", "--weights-seed", help="Seed of 'random' weights, to rebuild them (nothing else in predict is random); default: the weights seed the cache records."),
    device: str = typer.Option(PREDICT.device, "--device", help="auto (CUDA when present), cpu, or cuda[:N]."),
    batch_size: int = typer.Option(PREDICT.batch_size, "--batch-size"),
    workers: Optional[int] = typer.Option(PREDICT.workers, "--workers", help="Image-decoding worker processes (default: none for a batch of photos or fewer, else cores - 1)."),
    cache: Path = CacheOpt,
) -> None:
    """Say where new photos were taken, with a head fitted on the cache (and the backbone its features came from)."""
    from featkit.prediction import Predictor, check_top, write_predictions_csv

    check_top(top)
    if csv is not None:
        from featkit.validate import ensure_writable_file

        ensure_writable_file(csv, "csv")  # refused before any photo is read
    predictor = Predictor(cache, head, weights=weights, seed=seed, device=device, batch_size=batch_size, workers=workers)
    try:
        predictions = predictor.predict([str(p) for p in inputs], top=top)
    except KeyboardInterrupt:  # nothing is saved by predict, so there is nothing to resume
        fail("interrupted before any prediction was printed; rerun the command", 130)
    good = [p for p in predictions if p.error is None]
    for p in predictions:
        if p.error is not None:
            typer.echo(printable(f"{p.source}: unreadable ({p.error})"), err=True)
    for line in (_json_lines(predictions) if json else [printable(line) for line in _table_lines(good)]):
        typer.echo(line)  # photo and place names are outside text: escaped for the terminal
    if csv is not None:
        write_predictions_csv(csv, predictions)
    bad = len(predictions) - len(good)
    where = f"; -> {csv}" if csv is not None else ""
    typer.echo(f"{len(good)} predicted, {bad} unreadable; {predictor.describe()}{where}", err=True)
    if not good:
        fail(f"none of the {len(predictions)} photo(s) could be read", 1)


def _table_lines(predictions) -> list[str]:
    """``photo  city1 0.62  city2 0.20  city3 0.07``, the photos in one column."""
    width = max((len(p.source) for p in predictions), default=0)
    return [f"{p.source:<{width}}  " + "  ".join(f"{city} {prob:.2f}" for city, prob in p.top) for p in predictions]


def _json_lines(predictions) -> list[str]:
    return [json_printable(jsonlib.dumps(p.to_dict(), ensure_ascii=False)) for p in predictions]


@app.command()
@clean_errors
def demo(
    cache: Path = CacheOpt,
    reports: Path = ReportsOpt,
    weights: Optional[str] = typer.Option(DEMO.weights, "--weights", help="'random' (offline default), a state_dict file for vgg16().features / vgg16(), or 'torchvision' for torchvision's ImageNet weights."),
    cities: str = typer.Option(DEMO.cities, "--cities", help="Which of the default cities to generate photos of."),
    per_city: int = typer.Option(DEMO.per_city, "--per-city", help="Generated photos per city."),
    image_size: Optional[str] = typer.Option(BACKBONE.image_size, "--image-size", help="Input size: 224 (a square) or WIDTHxHEIGHT (320x224); default: the backbone's own."),
    device: str = DeviceOpt,
    seed: int = typer.Option(DEMO.seed, "--seed", help="Seed of everything the demo draws: the generated photos, the random weights, the split and the training."),
    max_iter: int = typer.Option(DEMO.max_iter, "--max-iter", "--epochs", help="MLP: most epochs (the generated photos are easy)."),
    progress: bool = ProgressOpt,
) -> None:
    """The whole job offline in minutes: generated photos of a few cities written to CACHE/demo/photos,
    extracted, three heads fitted and compared (outputs under CACHE/demo, REPORTS/demo)."""
    from featkit.demo import run_demo

    results, paths = run_demo(
        cache / "demo", reports / "demo", cities=cities, per_city=per_city, weights=None if weights == "torchvision" else weights,
        image_size=image_size, device=device, seed=seed, max_iter=max_iter, progress=progress, log=lambda m: typer.echo(m, err=True),
    )
    summary = ", ".join(f"{h} {m.accuracy:.3f}" for h, m in results.heads.items())
    chance = 1 / len(results.cities)
    typer.echo(f"demo done: test accuracy {summary} (chance {chance:.3f}) on GENERATED photos of {', '.join(results.cities)}, not real ones")
    typer.echo(f"report: {paths['html']} (open in a browser; compare.md, compare.json, confusion_*.png beside it); features and heads: {cache / 'demo'}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
