"""``qcache calibrate``: choose a checkpoint's lazy schedule from attention divergences (see calibrate.py)."""

from __future__ import annotations

from pathlib import Path

from ..lazy.schedule import MODES
from .common import HelpFormatter, add_mesh_options


def register(subparsers) -> None:
    """Add the ``calibrate`` subcommand to an ``argparse`` subparsers object."""
    from ..tools.calibrate import DEFAULT_LAZY_FRACTION, PROMPTS_FILE, ROWS

    c = subparsers.add_parser(
        "calibrate",
        help="measure layer-to-layer attention divergence and write the lazy schedule (--lazy auto)",
        description=(
            "Run the dense model on calibration samples, measure the Jensen-Shannon divergence (nats) "
            "between layers' attention rows, choose the lazy layers and write CKPT/schedule.json "
            "(read by --lazy auto), a plot and a table."
        ),
        formatter_class=HelpFormatter,
    )
    c.add_argument("ckpt", help="checkpoint directory (from qcache convert)")
    c.add_argument(
        "--data",
        required=True,
        help=(
            f'JSONL of {{"image": path, "prompt": text}} lines, or a folder of images with {PROMPTS_FILE} '
            "(one prompt per line, applied to every image)"
        ),
    )
    rule = c.add_mutually_exclusive_group()
    rule.add_argument(
        "--threshold", type=float, metavar="EPS",
        help="a layer is lazy when its divergence to the previous layer and to its block's anchor are below EPS",
    )
    rule.add_argument(
        "--lazy-fraction", type=float, metavar="F",
        help=f"make round(F * layers) layers lazy, lowest divergence first (default {DEFAULT_LAZY_FRACTION})",
    )
    c.add_argument("--keep-first", type=int, default=1, metavar="N", help="layers 0..N-1 are never lazy (default 1: layer 0)")
    c.add_argument(
        "--rows", choices=ROWS, default="last", help="attention rows compared: the last prompt token's, or every text token's"
    )
    c.add_argument(
        "--mode", choices=MODES, default="vla", help="vla: image part of the rows (renormalised); gla: whole rows"
    )
    c.add_argument("--max-samples", type=int, metavar="N", help="use at most N samples")
    c.add_argument("--out", metavar="SCHEDULE.json", help="where to write the schedule (default CKPT/schedule.json)")
    c.add_argument("--plot", metavar="PATH.png", help="where to write the plot (default: beside the schedule, .png)")
    add_mesh_options(c)
    c.add_argument("--quiet", action="store_true", help="no progress messages or bar")
    c.set_defaults(func=run)


def run(args) -> int:
    """Handler of ``qcache calibrate``: calibrates, prints the table and summary, returns 0.
    User errors raise :class:`~qcache_jax.errors.QCacheError` (the CLI prints them as one line)."""
    from ..lazy.schedule import SCHEDULE_FILE
    from ..tools.calibrate import calibrate, format_table, summary
    from .common import load_model

    out = Path(args.out) if args.out else Path(args.ckpt) / SCHEDULE_FILE
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    result = calibrate(
        load_model(args),
        args.data,
        threshold=args.threshold,
        lazy_fraction=args.lazy_fraction,
        keep_first=args.keep_first,
        mode=args.mode,
        rows=args.rows,
        max_samples=args.max_samples,
        out=out,
        plot=plot,
        progress=not args.quiet,
    )
    print(format_table(result))
    print(summary(result))
    print(f"wrote {result.schedule_path}")
    print(f"wrote {result.plot_path}")
    return 0
