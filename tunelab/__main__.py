"""tunelab's command line: command name -> (arguments, function); nothing else."""

from __future__ import annotations

import argparse
import sys

from tunelab.compare.cli import (
    add_advise_arguments,
    add_compare_arguments,
    run_advise,
    run_compare,
)
from tunelab.compare.tune import add_arguments as add_tune_arguments
from tunelab.compare.tune import run as run_tune
from tunelab.errors import TunelabError
from tunelab.evaluate.cli import (
    add_eval_arguments,
    add_label_words_arguments,
    add_predict_arguments,
    run_eval,
    run_label_words,
    run_predict,
)
from tunelab.serve.cli import add_arguments as add_serve_arguments
from tunelab.serve.cli import run as run_serve
from tunelab.train.cli import add_arguments as add_train_arguments
from tunelab.train.cli import run as run_train

COMMANDS = {
    "train": (add_train_arguments, run_train),
    "eval": (add_eval_arguments, run_eval),
    "predict": (add_predict_arguments, run_predict),
    "label-words": (add_label_words_arguments, run_label_words),
    "compare": (add_compare_arguments, run_compare),
    "tune": (add_tune_arguments, run_tune),
    "advise": (add_advise_arguments, run_advise),
    "serve": (add_serve_arguments, run_serve),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Prompt tuning versus fine-tuning of language models, measured on your data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, fn) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=fn.__doc__, description=fn.__doc__))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in results files
    try:
        COMMANDS[args.command][1](args)
    except TunelabError as e:
        print(f"tunelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
