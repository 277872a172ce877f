"""Export a trained run for inference: `python -m gemma_fusion.export run=RUN quant=none|int8|int4 out=OUT`
(`--help` lists every key; the steps and the directory's layout: gemma_fusion/inference/export.py; reading it
back: gemma_fusion/artifacts/export.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from gemma_fusion.artifacts.export import load_export
from gemma_fusion.core.cli import option, parse_cli
from gemma_fusion.core.errors import exit_on_user_error
from gemma_fusion.inference.export import QUANTS, export_run
from gemma_fusion.models.backbone import DTYPES

__all__ = ["ExportOptions", "export_run", "load_export", "main"]


@dataclass
class ExportOptions:
    """Export a trained run as one self-contained directory: LoRA merged, decoder quantised once."""

    run: str = option(help="a directory written by train.py", metavar="RUN")
    out: str = option(help="the directory to write (built next to it, renamed into place)", metavar="OUT")
    quant: str = option("none", "weight-only quantisation of the decoder's Linear layers", choices=QUANTS)
    group_size: int = option(64, "int4: inputs per scale", ge=1)
    overwrite: bool = option(False, "replace a non-empty out")
    dtype: str | None = option(None, "the backbone's dtype (null: the run's backbone.dtype)", choices=tuple(DTYPES))
    trust_remote_code: bool = option(False, "export a run whose backbone ships its own code")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = parse_cli(ExportOptions, argv, prog="python -m gemma_fusion.export")

    def run() -> None:
        out = export_run(opts.run, opts.out, opts.quant, opts.group_size, opts.overwrite, opts.dtype,
                         opts.trust_remote_code)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        print(f"exported {opts.run} -> {out} (quant={opts.quant}, {size / 2**20:.1f} MiB)")

    exit_on_user_error(run)


if __name__ == "__main__":
    main()
