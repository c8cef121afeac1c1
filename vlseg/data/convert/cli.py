"""The command-line options and exit status shared by the ``scripts/prepare_*.py`` converters."""

from __future__ import annotations

import sys

from vlseg.data.convert.common import ConversionError


def add_output_arguments(parser) -> None:
    """The options every ``scripts/prepare_*.py`` shares: the datalist path, its name and description, and how the
    conversion treats and reports problems (add them after the layout's own options)."""
    parser.add_argument("--output", required=True, help="datalist .json path, or a folder (-> <folder>/datalist.json)")
    parser.add_argument("--name", help="dataset name stored in the datalist")
    parser.add_argument("--description", help="description stored in the datalist")
    parser.add_argument("--strict", action="store_true", help="fail on any unmatched row or file")
    parser.add_argument("--copy", action="store_true", help="copy images and masks next to the datalist")
    parser.add_argument("--quiet", action="store_true", help="do not print the match report")


def run_converter(convert, args, *positional, **kwargs) -> int:
    """``convert(*positional, output=args.output, **kwargs)`` with the options of :func:`add_output_arguments`:
    the exit status of a ``prepare_*`` command (1 after printing a :class:`ConversionError` to stderr)."""
    try:
        convert(*positional, output=args.output, name=args.name, description=args.description, strict=args.strict,
                copy=args.copy, verbose=not args.quiet, **kwargs)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
