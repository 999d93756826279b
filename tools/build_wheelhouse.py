#!/usr/bin/env python3
"""Build an offline wheelhouse (megatron-core + TransformerEngine [+ vLLM]) for an air-gapped GPU image.

    python tools/build_wheelhouse.py --out .wheelhouse --freeze gpu-box-freeze.txt --split-mb 60
    python tools/build_wheelhouse.py --out wh --freeze freeze.txt --stack gpu --split-mb 60

`--stack gpu` is the whole GPU stack in one environment: megatron-core, TransformerEngine, vLLM and
the project's own dependencies (with gguf), TE/vLLM's disagreement resolved by explicit overrides.

Then copy the output directory to the GPU node and run `bash <out>/install.sh` there
(see docs/wheelhouse.md). Needs only python3 + pip on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a bare checkout on a login node

from megatron_sdzero.wheelhouse import (  # noqa: E402
    DEFAULT_IMPORT_CHECK,
    DEFAULT_KEEP_IMAGE,
    DEFAULT_REQUIREMENTS,
    DEFAULT_SOURCE_ONLY,
    VLLM,
    VLLM_CONSTRAINTS,
    VLLM_TE_OVERRIDES,
    IndexOptions,
    Override,
    Requirement,
    TargetEnv,
    WheelhouseOptions,
    build_wheelhouse,
    canonicalize_name,
    summary_lines,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    parser.add_argument("--freeze", type=Path, default=None, help="`pip list --format=freeze` of the image")
    parser.add_argument(
        "--requirement",
        "-r",
        action="append",
        default=None,
        metavar="REQ",
        help=f"replaces the defaults: {', '.join(DEFAULT_REQUIREMENTS)}",
    )
    parser.add_argument(
        "--stack",
        choices=sorted(STACKS),
        default=None,
        help="gpu: --with-vllm --with-project-deps --project-extra gguf (one environment for everything)",
    )
    parser.add_argument(
        "--with-vllm",
        action="store_true",
        help=f"add {VLLM} (~300 MB wheel + many deps); with TE, installs the overrides in docs/wheelhouse.md",
    )
    parser.add_argument(
        "--with-project-deps",
        action="store_true",
        help="add megatron_sdzero's own [project.dependencies] from pyproject.toml",
    )
    parser.add_argument(
        "--project-extra",
        action="append",
        default=[],
        metavar="EXTRA",
        help="add the pyproject [project.optional-dependencies] EXTRA (e.g. gguf, trl)",
    )
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--arch", default="x86_64")
    parser.add_argument("--glibc", default="2.35", help="newest manylinux_X_Y tag the node accepts")
    parser.add_argument("--split-mb", type=float, default=None, help="split files larger than this")
    parser.add_argument(
        "--source-only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"also fetch NAME as an sdist to build on the node (always: {sorted(DEFAULT_SOURCE_ONLY)})",
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="NAME",
        help=f"never replace the image's NAME (always: {sorted(DEFAULT_KEEP_IMAGE)})",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="leave NAME (and what only it needs) out; install.sh then installs with --no-deps",
    )
    parser.add_argument(
        "--constraint",
        "-c",
        action="append",
        default=[],
        metavar="SPEC",
        help="narrow a package's versions wherever it is required, e.g. 'xgrammar<=0.2.7'",
    )
    parser.add_argument("--import-check", nargs="+", default=None, metavar="MODULE")
    parser.add_argument("--index-url", default=None, help="default: pip's configuration, else PyPI")
    parser.add_argument("--find-links", action="append", type=Path, default=[])
    parser.add_argument("--no-index", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 when requirements conflict")
    return parser.parse_args(argv)


# Named sets of the flags below: (with_vllm, with_project_deps, project extras).
STACKS = {"gpu": (True, True, ("gguf",))}
# What the install's import check adds for the project's own dependencies and extras.
PROJECT_IMPORT_CHECK = ("datasets", "math_verify")
EXTRA_IMPORT_CHECK = {"gguf": "gguf"}


def project_requirements(base: bool, extras: list[str]) -> list[str]:
    """pyproject.toml's [project.dependencies] (if base) and the named [project.optional-dependencies]."""
    with open(REPO / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    unknown = sorted(set(extras) - set(project["optional-dependencies"]))
    if unknown:
        raise SystemExit(f"build_wheelhouse: no such extra in pyproject.toml: {', '.join(unknown)}")
    requirements = list(project["dependencies"]) if base else []
    return requirements + [r for extra in extras for r in project["optional-dependencies"][extra]]


def _requires_te(requirements: list[str]) -> bool:
    return any(canonicalize_name(Requirement(r).name) == "transformer-engine" for r in requirements)


def options_from_args(args: argparse.Namespace) -> WheelhouseOptions:
    with_vllm, with_project_deps, stack_extras = STACKS.get(args.stack, (False, False, ()))
    with_vllm |= args.with_vllm
    with_project_deps |= args.with_project_deps
    extras = list(dict.fromkeys([*stack_extras, *args.project_extra]))

    requirements = list(args.requirement or DEFAULT_REQUIREMENTS)
    requirements += project_requirements(with_project_deps, extras)
    import_check = list(args.import_check or DEFAULT_IMPORT_CHECK)
    if args.import_check is None:
        import_check += list(PROJECT_IMPORT_CHECK) if with_project_deps else []
        import_check += [EXTRA_IMPORT_CHECK[e] for e in extras if e in EXTRA_IMPORT_CHECK]
    constraints = list(args.constraint)
    overrides: tuple[Override, ...] = ()
    if with_vllm:
        requirements.append(VLLM)
        import_check.append("vllm")
        constraints += VLLM_CONSTRAINTS
        overrides = VLLM_TE_OVERRIDES if _requires_te(requirements) else ()
    major, minor = (int(x) for x in args.glibc.split("."))
    return WheelhouseOptions(
        requirements=tuple(requirements),
        target=TargetEnv(python_version=args.python_version, arch=args.arch, max_glibc=(major, minor)),
        index=IndexOptions(
            index_url=args.index_url, find_links=tuple(args.find_links), no_index=args.no_index
        ),
        source_only=DEFAULT_SOURCE_ONLY | set(args.source_only),
        keep_image=DEFAULT_KEEP_IMAGE | set(args.keep),
        exclude=frozenset(args.exclude),
        constraints=tuple(constraints),
        overrides=overrides,
        split_mb=args.split_mb,
        import_check=tuple(import_check),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    resolution = build_wheelhouse(args.out, options_from_args(args), args.freeze)
    print("\n".join(summary_lines(args.out, resolution)))
    print(f"built in {time.perf_counter() - start:.0f} s")
    print(f"install on the node: bash {args.out}/install.sh   (--help for options)")
    return 1 if args.strict and resolution.conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
