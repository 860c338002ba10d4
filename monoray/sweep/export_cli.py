"""`monoray export RUN_DIR|MODEL_URI --format saelens|npz --out DIR`: an SAE for other tools.

RUN_DIR is a run directory (its `sae/`; a run made before the artifact: its
checkpoint) or an artifact directory; MODEL_URI an MLflow URI (`runs:/<id>/sae`,
`models:/<name>/<version>`, `mlflow-artifacts:/...`) read from `--tracking-uri`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from monoray.sae.export import FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a trained SAE as SAELens or npz files", description=__doc__
    )
    p.add_argument("source", metavar="RUN_DIR|MODEL_URI", help="run dir, sae/ dir or MLflow URI")
    p.add_argument("--format", required=True, choices=FORMATS, help="saelens or npz")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--root", help="project directory (default: ./monoray-runs or $MONORAY_HOME)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: <root>/mlflow.db)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from monoray.errors import InputError
    from monoray.sae.export import SAELENS_ARCH, export_sae, input_note
    from monoray.sae.io import URI_SCHEMES
    from monoray.sweep.paths import ProjectPaths
    from monoray.train.artifact import open_run_sae

    tracking_uri = None
    if str(args.source).startswith(URI_SCHEMES):
        from monoray.sweep.tracking import check_tracking_uri

        paths = ProjectPaths.resolve(args.root)
        tracking_uri = args.tracking_uri or paths.tracking_uri
        if not args.tracking_uri and not (paths.root / "mlflow.db").exists():
            raise InputError(f"no MLflow records in {paths.root}; pass --root or --tracking-uri")
        check_tracking_uri(tracking_uri)
    art = open_run_sae(args.source, tracking_uri=tracking_uri)
    out = export_sae(art, args.out, args.format)
    arch = art.sae.cfg.arch
    as_arch = f" as SAELens {SAELENS_ARCH[arch]}" if args.format == "saelens" else ""
    print(f"wrote {out}/ ({arch} SAE{as_arch}, d_in {art.sae.cfg.d_in}, d_sae {art.sae.cfg.d_sae})")
    note = input_note(art)
    if note is not None:
        print(note)
    return 0
