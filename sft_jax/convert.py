"""Convert between HF model directories (any supported family) and sft_jax orbax checkpoints.

  python -m sft_jax.convert hf-to-orbax SRC DST            # SRC: HF dir or hub name; writes step 0
  python -m sft_jax.convert orbax-to-hf SRC DST [--dtype bfloat16] [--overwrite]
  python -m sft_jax.convert merge SRC DST [--base DIR] [--dtype bfloat16] [--overwrite]

orbax-to-hf takes any training checkpoint (root = newest step, or a step dir). merge takes a
LoRA run's checkpoint or a PEFT adapter dir and writes base + adapters merged as a plain HF
model dir, verified against peft when it is importable. Relative and ~ paths are fine; user
errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sft_jax import cli
from sft_jax.core import checkpoint
from sft_jax.models import hf_io as hf


def hf_to_orbax(src: str, dst: str, *, overwrite: bool = False) -> None:
    if checkpoint.latest_step(dst) is not None and not overwrite:
        raise hf.HFFormatError(f"{dst} already holds checkpoints; pass --overwrite to add step 0 anyway")
    cfg, params = hf.load_hf(src)
    tokenizer = hf.load_tokenizer(src)
    manager = checkpoint.make_manager(dst, async_save=False)
    checkpoint.save(manager, 0, params=params, model_config=cfg, tokenizer=tokenizer, force=True)
    manager.wait_until_finished()
    manager.close()


def orbax_to_hf(src: str, dst: str, *, dtype: str = "float32", overwrite: bool = False,
                chat_template: str | None = None) -> hf.ExportReport:
    restored = checkpoint.restore(src)
    cfg, params, tokenizer = restored["model_config"], restored["params"], restored["tokenizer"]
    return hf.export_hf(params, cfg, dst, tokenizer=tokenizer, chat_template=chat_template,
                        dtype=dtype, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF dir or hub name -> orbax checkpoint (step 0)")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> verified HF dir")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--chat-template", type=Path, help="file whose text replaces the tokenizer's chat template")
    m = sub.add_parser("merge", help="LoRA checkpoint or PEFT adapter dir + its base -> verified merged HF dir")
    m.add_argument("src", help="a LoRA run's checkpoint (root or step dir) or a PEFT adapter dir")
    m.add_argument("dst")
    m.add_argument("--base", help="the base model (default: the one the checkpoint or adapter_config.json names)")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    m.add_argument("--overwrite", action="store_true")
    args = cli.parse(parser, argv)
    src = cli.resolve_path(args.src, must_be_local=args.command != "hf-to-orbax")  # hf-to-orbax: or a hub name
    dst = cli.resolve_path(args.dst, must_be_local=True)
    try:
        if args.command == "hf-to-orbax":
            hf_to_orbax(src, dst, overwrite=args.overwrite)
            print(f"wrote {dst} (step 0)")
        elif args.command == "merge":
            from sft_jax.adapters.merge import merge_to_hf

            base = cli.resolve_path(args.base) if args.base else None
            report, peft_check = merge_to_hf(src, dst, base=base, dtype=args.dtype, overwrite=args.overwrite)
            checks = report.checks + ([peft_check] if peft_check else [])
            print(f"wrote {report.out_dir} ({report.dtype}, LoRA merged); verified: " + "; ".join(checks))
        else:
            template = args.chat_template.expanduser().read_text() if args.chat_template else None
            report = orbax_to_hf(src, dst, dtype=args.dtype, overwrite=args.overwrite, chat_template=template)
            print(f"wrote {report.out_dir} ({report.dtype}); verified: " + "; ".join(report.checks))
    except (ValueError, OSError) as e:  # HFFormatError, CheckpointError, missing files: user errors
        return cli.user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
