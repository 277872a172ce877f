"""Generate from a trained run or an export: `python -m gemma_fusion.infer run=RUN [image=] [audio=] prompt="…"`.

The text streams to stdout as tokens arrive; stderr gets the time to first token and the decode speed.
`prompts=FILE.jsonl` answers one prompt per line (`{"prompt", "image"?, "audio"?, "id"?}`) and writes one
JSON line per prompt (`{"id", "prompt", "output", "ttft_s", "tokens_per_s"}`) to `out=` (default stdout).
`--help` lists every key. Relative paths are relative to the working directory. The sample is built exactly
as the run's data loader builds one (gemma_fusion/inference/serve.py). A mistake (unknown option, bad value,
missing file) ends with one sentence and exit status 2.
"""
from __future__ import annotations

from dataclasses import dataclass

from gemma_fusion.core.cli import call_or_exit, option, parse_cli
from gemma_fusion.core.errors import UserError
from gemma_fusion.inference.serve import serve


@dataclass
class InferOptions:
    """Generate from a trained run or an export: one prompt (streamed), or a JSONL file of prompts."""

    run: str = option(help="a directory written by train.py or by gemma_fusion.export", metavar="PATH")
    prompt: str | None = option(None, "the prompt text (or prompts=FILE.jsonl)", metavar="TEXT")
    image: str | None = option(None, "an image file for the prompt")
    audio: str | None = option(None, "an audio file for the prompt")
    prompts: str | None = option(None, 'JSONL, one {"prompt", "image"?, "audio"?, "id"?} per line', metavar="FILE")
    out: str | None = option(None, "where prompts= mode writes its JSON lines (null: stdout)")
    max_new_tokens: int = option(64, "tokens to generate at most", ge=1)
    temperature: float = option(0.0, "0 is greedy; above 0 samples", ge=0)
    top_k: int = option(0, "sample among the k likeliest tokens (0: all)", ge=0)
    top_p: float = option(1.0, "sample within this probability mass", gt=0, le=1)
    seed: int = option(0, "sampling seed")
    device: str = option("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    batch_size: int = option(8, "prompts per batch in prompts= mode", ge=1)
    trust_remote_code: bool = option(False, "load a run whose backbone ships its own code")

    def validate(self) -> None:
        if (self.prompt is None) == (self.prompts is None):
            raise UserError("pass either prompt=TEXT (with optional image= and audio=) or prompts=FILE.jsonl.")
        if self.prompts is not None and (self.image or self.audio):
            raise UserError("with prompts=FILE.jsonl give each prompt's image and audio in its line, not as "
                            "image=/audio=.")


def main(argv: list[str] | None = None) -> list[dict]:
    opts = parse_cli(InferOptions, argv, prog="python -m gemma_fusion.infer")
    return call_or_exit(serve, opts, status=2)


if __name__ == "__main__":
    main()
