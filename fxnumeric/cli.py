"""The ``fxnumeric`` command."""

from __future__ import annotations

import argparse
import sys
import warnings

__all__ = ["main"]

_EXAMPLES = """examples:
  fxnumeric demo        pair and compare torchvision's quantizable resnet18 and the
                        tutorial's LSTM (random weights, no network needed)
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="fxnumeric",
        description="Find where a quantized PyTorch model loses accuracy.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in demo")
    args = parser.parse_args(argv)
    from .errors import FxNumericError

    try:
        with warnings.catch_warnings():
            # torch warns that eager/FX quantization is deprecated on every call; the demo uses it.
            warnings.filterwarnings("ignore", message=".*deprecat.*")
            if args.command == "demo":
                from .demo import run_demo

                run_demo()
    except FxNumericError as exc:
        if args.debug:
            raise
        print(f"fxnumeric: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
