"""Export a trained run for inference: `python -m gemma_fusion.export run=RUN quant=none|int8|int4 out=OUT`
(the steps and the directory's layout: gemma_fusion/inference/export.py; reading it back:
gemma_fusion/artifacts/export.py)."""
from __future__ import annotations

import logging
import sys

from gemma_fusion.artifacts.export import load_export
from gemma_fusion.core.errors import UserError, exit_on_user_error
from gemma_fusion.inference.export import export_run

__all__ = ["export_run", "load_export", "main"]


def parse_args(argv: list[str]) -> dict:
    args = {"quant": "none", "group_size": "64", "overwrite": "false", "dtype": None, "trust_remote_code": "false"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("run", "out", "quant", "group_size", "overwrite", "dtype", "trust_remote_code"):
            raise UserError(f"export: unexpected argument {arg!r}; usage: python -m gemma_fusion.export run=RUN "
                            "quant=none|int8|int4 out=OUT [dtype=bfloat16|float32] [group_size=64] [overwrite=true] "
                            "[trust_remote_code=true].")
        args[key] = value
    for key in ("run", "out"):
        if key not in args:
            raise UserError(f"export: {key}= is required; usage: python -m gemma_fusion.export run=RUN "
                            "quant=none|int8|int4 out=OUT.")
    if not args["group_size"].isdigit() or int(args["group_size"]) < 1:
        raise UserError(f"export: group_size={args['group_size']} must be a positive integer.")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def run(argv):
        args = parse_args(argv)
        out = export_run(args["run"], args["out"], args["quant"], int(args["group_size"]),
                         args["overwrite"].lower() in ("1", "true", "yes"), args["dtype"],
                         args["trust_remote_code"].lower() in ("1", "true", "yes"))
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        print(f"exported {args['run']} -> {out} (quant={args['quant']}, {size / 2**20:.1f} MiB)")

    exit_on_user_error(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
