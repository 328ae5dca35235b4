"""The ``mriaudit`` command: ``mriaudit INPUT OUTPUT [participant|group] [options]``.

A BIDS-Apps-style front door to the one Snakefile; nothing is re-implemented
here. The command builds a Snakemake command line (absolute input and output
paths, the project's profiles by name, ``--config`` passed through) and runs it
from the project folder, so a run through the command and a raw ``snakemake``
run are the same run (same ``.snakemake`` metadata, same ``profiles/default``).

Levels: ``participant`` runs every subject's chain up to template space and its
quality metrics (rule ``preprocess``); ``group`` (the default) runs the whole
audit: the model, every subject's score, the tables and the report, reusing
whatever a participant run finished.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import yaml

#: The project folder: the Snakefile, config.yaml and profiles/ (an editable install, as
#: ``make venv`` makes, keeps the package inside it).
PROJECT = Path(__file__).resolve().parents[2]
SNAKEFILE = PROJECT / "Snakefile"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
LEVELS = ("participant", "group")
#: The rule a participant-level run stops after.
PARTICIPANT_RULE = "preprocess"


def version() -> str:
    """The installed package's version ("unknown" when it is not installed)."""
    try:
        return importlib.metadata.version("mriaudit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def config_keys(schema_path: Path = SCHEMA) -> list[tuple[str, str, str]]:
    """``(key, default, first sentence of its description)`` of the config schema's
    top-level keys, in schema order; empty when the schema is absent."""
    if not schema_path.is_file():
        return []
    schema = yaml.safe_load(schema_path.read_text()) or {}
    keys = []
    for key, spec in (schema.get("properties") or {}).items():
        description = " ".join(str(spec.get("description", "")).split())
        first = description.split(". ")[0].rstrip(".")
        default = spec.get("default", "")
        shown = "" if isinstance(default, dict | list) else str(default)
        # Keys of an object (those of "then" where the key may also be a string).
        properties = spec.get("properties") or (spec.get("then") or {}).get("properties") or {}
        nested = list(properties)
        if nested:
            first += f" (keys: {', '.join(nested)})"
        keys.append((key, shown, first))
    return keys


def _epilog() -> str:
    lines = ["config keys (--config KEY=VALUE; nested keys in a --configfile):"]
    for key, default, description in config_keys():
        head = f"  {key}" + (f" (default {default})" if default else "")
        lines.append(head)
        lines.extend(
            textwrap.wrap(
                description, width=76, initial_indent="      ", subsequent_indent="      "
            )
        )
    lines += [
        "",
        "profiles: 'slurm' (a SLURM cluster, GPU jobs for the model) or a folder;",
        "local runs always add profiles/default (keep going past a failed subject).",
        "Arguments after '--' go to snakemake unchanged.",
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog="mriaudit",
        description=(
            "Audit a cohort of MRI scans (DICOM or NIfTI folders, archives, or a BIDS root): "
            "conversion, N4, registration, quality metrics, a normative anomaly model, and "
            "one HTML report with an exclusion list."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument(
        "input_dir",
        type=Path,
        help="the cohort: one folder or archive per subject, or a BIDS root (only read)",
    )
    result.add_argument("output_dir", type=Path, help="where every output goes (created)")
    result.add_argument(
        "level",
        nargs="?",
        choices=LEVELS,
        default="group",
        help="participant: each subject up to its quality metrics; group (default): the whole audit",
    )
    result.add_argument(
        "--labels", type=Path, help="TSV folder, truth (1 = should be excluded): ROC/PR curves"
    )
    result.add_argument(
        "--cores", help="CPU cores (default: all; with a profile, the profile's own setting)"
    )
    result.add_argument("--profile", help="'slurm', or a profile folder")
    result.add_argument("--configfile", type=Path, help="YAML config on top of config.yaml")
    result.add_argument(
        "--config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config values",
    )
    result.add_argument("-n", "--dry-run", action="store_true", help="show the jobs, run nothing")
    result.add_argument("--version", action="version", version=f"mriaudit {version()}")
    return result


def _profile(name: str) -> str:
    folder = PROJECT / "profiles" / name
    return str(folder) if "/" not in name and folder.is_dir() else str(Path(name).resolve())


def snakemake_command(argv: Sequence[str]) -> list[str]:
    """The Snakemake command line (run from ``PROJECT``) for the ``mriaudit`` arguments
    ``argv``; arguments after ``--`` are appended unchanged. Raises ``SystemExit``
    (argparse's usage message) on bad arguments."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    for entry in args.config:
        if "=" not in entry:
            parser().error(f"--config takes KEY=VALUE, got {entry!r}")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE)]
    # A cluster profile sets its own cores (the largest job); the command line would win.
    if args.cores or not args.profile:
        command += ["--cores", str(args.cores or "all")]
    if args.profile:
        command += ["--profile", _profile(args.profile)]
    if args.configfile:
        command += ["--configfile", str(args.configfile.resolve())]
    config = [f"input_dir={args.input_dir.resolve()}", f"output_dir={args.output_dir.resolve()}"]
    if args.labels:
        config.append(f"labels={args.labels.resolve()}")
    command += ["--config", *config, *args.config]
    if args.level == "participant":
        command += ["--until", PARTICIPANT_RULE]
    if args.dry_run:
        command.append("--dry-run")
    return command + extra


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = snakemake_command(argv)
    if not SNAKEFILE.is_file():
        message = (
            f"mriaudit: no Snakefile at {SNAKEFILE}: install the package from its project "
            "folder (make venv, or pip install -e .)"
        )
        print(message, file=sys.stderr)
        return 2
    return subprocess.run(command, cwd=PROJECT, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
