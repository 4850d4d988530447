"""`python -m vesperjax.data build|info`: build token caches ahead of training, inspect them.

  python -m vesperjax.data build --dataset stdlib --tokenizer bpe:8192 --out DIR
  python -m vesperjax.data info DIR
"""
import argparse
import glob
import os
import sys

from vesperjax.cli import version_line
from vesperjax.data import errors
from vesperjax.data.cache import HEADER, TokenCache
from vesperjax.data.prepare import prepare_dataset, prepare_train_val


def _describe(c: TokenCache) -> str:
  h = c.header
  return (f"{c.path}\n  dataset {h['dataset']} split {h['split']}\n"
          f"  tokens {c.num_tokens:,}  documents {c.num_docs:,}  vocab {c.vocab_size:,}"
          f"  eod {c.eod_id}  dtype {c.dtype.name}\n"
          f"  size on disk {c.nbytes_on_disk() / 1e6:.2f} MB  tokenizer {h['tokenizer_hash']}"
          f"  built in {h.get('build_seconds', '?')} s")


def build(args) -> None:
  kw = dict(text_field=args.text_field, val_percent=args.val_percent,
            progress=not args.quiet)
  if args.split == "both":
    train, val, tok = prepare_train_val(args.dataset, args.tokenizer, args.out,
                                        val_dataset=args.val_dataset, **kw)
    caches = [train] + ([val] if val else [])
  else:
    c, tok = prepare_dataset(args.dataset, args.tokenizer, args.out, args.split, **kw)
    caches = [c]
  print(f"tokenizer: vocab {tok.vocab_size:,}, eod {tok.eod_id}, hash {tok.hash}"
        + (f", {tok.path}" if tok.path else ""))
  for c in caches:
    print(_describe(c))


def info(args) -> None:
  path = os.path.expanduser(args.dir)
  if not os.path.exists(path):
    raise errors.MissingPathError(f"{args.dir}: no such directory")
  dirs = [path] if os.path.isfile(os.path.join(path, HEADER)) else sorted(
      os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", HEADER)))
  if not dirs:
    raise errors.CacheError(f"{args.dir}: no token caches here")
  for d in dirs:
    print(_describe(TokenCache.open(d, verify=True)))  # damage is reported here too
  for t in sorted(glob.glob(os.path.join(path, "tokenizer-*.json"))):
    print(f"tokenizer {t}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m vesperjax.data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Each command's flags: python -m vesperjax.data "
                              "build --help (or info --help).")
  p.add_argument("--version", action="version", version=version_line())
  sub = p.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="tokenize a dataset into token caches")
  b.add_argument("--dataset", required=True,
                 help="file (.txt/.jsonl/.json SQuAD/.parquet/.arrow), folder, glob, "
                 "comma-separated list, or stdlib; [:train|:val]")
  b.add_argument("--tokenizer", default="bpe:8192",
                 help="tokenizer.json path, bpe:N (train) or byte (default bpe:8192)")
  b.add_argument("--out", required=True, help="cache directory")
  b.add_argument("--split", default="both", choices=["both", "train", "val", "all"])
  b.add_argument("--val-dataset", default=None, help="separate validation dataset")
  b.add_argument("--text-field", default="text", help="JSONL field or Parquet/Arrow column holding the text")
  b.add_argument("--val-percent", type=float, default=5.0)
  b.add_argument("--quiet", action="store_true", help="no progress bars")
  b.set_defaults(fn=build)
  i = sub.add_parser("info", help="describe the caches in a directory")
  i.add_argument("dir")
  i.set_defaults(fn=info)
  args = p.parse_args(argv)
  try:
    args.fn(args)
  except errors.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
